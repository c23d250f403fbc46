"""Network presets for ``ep-train``.

- ``small``: two pooled conv layers (64, 128 channels), for the bundled 8x8 digits (the default).
- ``vgg5``: the VGG-5 of Laborieux et al. 2021 / Lin et al. 2025: 128-256-512-512 channels,
  3x3 convolutions with padding 1, 1, 1, 0, a 2x2 max-pool after each, linear readout
  (32x32 inputs: 32 -> 16 -> 8 -> 4 -> 2 -> 1, readout 512 -> classes).
- ``mlp``: fully connected state layers, for quick checks.

Initialisation is PyTorch's default (uniform, fan-in scaled) multiplied by ``init_scale``,
the ``my_init(scale)`` of Laborieux et al.'s code. Layers are named ``layers.<i>`` and
``readout`` (``EPNetwork``), which is what per-layer learning rates refer to.
"""
import math

import torch
import torch.nn as nn

from .layers import EPConv2d, EPLinear
from .network import EPNetwork

PRESETS = ("small", "vgg5", "mlp")


def _conv_stack(in_shape, specs, n_classes):
    """EPConv2d layers from (out_channels, kernel, padding, pool) specs; checks the sizes fit."""
    c, h, w = in_shape
    layers = []
    for out, k, pad, pool in specs:
        layer = EPConv2d(c, out, k, padding=pad, pool=pool)
        c, h, w = layer.state_shape((c, h, w))
        layers.append(layer)
    return layers, nn.Linear(c * h * w, n_classes)


def build_network(name, in_shape, n_classes, activation="hardsigmoid_half", init_scale=1.0, width=None, **kw):
    """An ``EPNetwork`` for inputs of shape ``in_shape`` = (C, H, W) and ``n_classes`` classes.

    ``width`` scales the channel / unit counts (1.0 = the preset's own). Other keywords (T1,
    T2, beta, nudging) go to ``EPNetwork``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (--preset); choose one of {', '.join(PRESETS)}")
    in_shape = tuple(int(v) for v in in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"build_network needs in_shape = (C, H, W), got {in_shape}")
    w = 1.0 if width is None else float(width)
    if w <= 0:
        raise ValueError(f"width must be positive, got {width}")
    ch = lambda n: max(1, int(round(n * w)))  # noqa: E731

    if name == "small":
        # 8x8 -> 4x4 -> 2x2. Larger inputs (MNIST 28x28) also work: 28 -> 14 -> 7 -> 3 (floor).
        # 64-128 channels: on the digits, 32-64 overfits (about 2 points lower test accuracy).
        layers, readout = _conv_stack(in_shape, [(ch(64), 3, 1, 2), (ch(128), 3, 1, 2)], n_classes)
    elif name == "vgg5":
        try:
            layers, readout = _conv_stack(
                in_shape, [(ch(128), 3, 1, 2), (ch(256), 3, 1, 2), (ch(512), 3, 1, 2), (ch(512), 3, 0, 2)],
                n_classes)
        except ValueError as e:
            raise ValueError(f"preset 'vgg5' needs inputs of at least 32x32 pixels (it was made for CIFAR); "
                             f"got shape {in_shape}: {e}") from e
    else:  # mlp
        n_in = math.prod(in_shape)
        layers = [EPLinear(n_in, ch(256))]
        readout = nn.Linear(ch(256), n_classes)

    if init_scale != 1.0:
        with torch.no_grad():
            for p in [p for m in list(layers) + [readout] for p in m.parameters()]:
                p.mul_(init_scale)
    return EPNetwork(*layers, readout=readout, activation=activation, **kw)
