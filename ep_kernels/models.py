"""Network presets for ``ep-train``.

- ``small``: two pooled conv layers (64, 128 channels), for the bundled 8x8 digits (the default).
- ``vgg5``: the VGG-5 of Laborieux et al. 2021 / Lin et al. 2025: 128-256-512-512 channels,
  3x3 convolutions with padding 1, 1, 1, 0, a 2x2 max-pool after each, linear readout
  (32x32 inputs: 32 -> 16 -> 8 -> 4 -> 2 -> 1, readout 512 -> classes).
- ``mlp``: fully connected state layers, for quick checks.
- ``vgg11``, ``vgg13``, ``vgg16``: deep VGG-style EP networks for 32x32 inputs (docs/design.md,
  "Deep presets' initialisation"): 8, 10 and 13 3x3 convolutions with padding 1 in five blocks, a 2x2 max-pool on
  the last convolution of each block (``EPConv2d(pool=2)``: 32 -> 16 -> 8 -> 4 -> 2 -> 1),
  linear readout 512 -> classes. Channels 64-128-256-512-512 (times ``width``).
- ``deep8``: a reduced deep preset for the bundled 8x8 digits (CPU demonstrations of the
  vanishing nudge and of training with intermediate signals): 8 convolutions (3x3, padding 1)
  in four blocks of two, channels 16-32-64-64 (times ``width``), the first block at 8x8 and a
  2x2 max-pool ending each of the others (8 -> 4 -> 2 -> 1), so every convolution sees at
  least a 2x2 map.

Deep presets record their blocks in ``net.block_ends`` (the index of each block's last layer);
``build_signals`` attaches the intermediate signals there by default (every block end except
the top layer, which the readout already supervises).

Initialisation of ``small``, ``vgg5`` and ``mlp``: PyTorch's default (uniform, fan-in scaled)
multiplied by ``init_scale`` (default 1), the ``my_init(scale)`` of Laborieux et al.'s code.

Deep presets need more care, measured on ``deep8`` (``examples/deep_digits.sh``): with the
default initialisation the states fade layer after layer (the top state hardly depends on the
input, and output-only EP stays at chance); scaled up, the states of a layer share one large
common offset (every state is >= 0, so ``W s`` carries ``mean(W) * sum(s)``) and the network
falls into input-independent attractors, where synchronous updates also oscillate. So deep
presets start from PyTorch's default weights, centred per output channel (zero mean over each
filter) in every layer that reads states (all but the first), times ``init_scale`` (default
``DEEP_GAIN / gain``: 3 with ``hardsigmoid_half``), with zero biases and the readout as PyTorch
makes it; and they relax with the ``alternating`` schedule (``EPNetwork``), which converges
where synchronous updates oscillate.

Layers are named ``layers.<i>`` and ``readout`` (``EPNetwork``), which is what per-layer
learning rates refer to.
"""
import math

import torch
import torch.nn as nn

from .relaxation import ACTIVATION_GAIN
from .layers import EPConv2d, EPLinear
from .network import EPNetwork

PRESETS = ("small", "vgg5", "mlp", "vgg11", "vgg13", "vgg16", "deep8")

# Blocks of (channels, number of 3x3 convolutions, pool after the block).
DEEP_BLOCKS = {
    "vgg11": [(64, 1, 2), (128, 1, 2), (256, 2, 2), (512, 2, 2), (512, 2, 2)],
    "vgg13": [(64, 2, 2), (128, 2, 2), (256, 2, 2), (512, 2, 2), (512, 2, 2)],
    "vgg16": [(64, 2, 2), (128, 2, 2), (256, 3, 2), (512, 3, 2), (512, 3, 2)],
    "deep8": [(16, 2, 1), (32, 2, 2), (64, 2, 2), (64, 2, 2)],
}
# Deep presets' default init_scale times the activation's gain (see the module docstring).
DEEP_GAIN = 1.5
SIGNAL_KINDS = ("classifier", "feature", "logit")


def _conv_stack(in_shape, specs, n_classes):
    """EPConv2d layers from (out_channels, kernel, padding, pool) specs; checks the sizes fit."""
    c, h, w = in_shape
    layers = []
    for out, k, pad, pool in specs:
        layer = EPConv2d(c, out, k, padding=pad, pool=pool)
        c, h, w = layer.state_shape((c, h, w))
        layers.append(layer)
    return layers, nn.Linear(c * h * w, n_classes)


def build_network(name, in_shape, n_classes, activation="hardsigmoid_half", init_scale=None, width=None,
                  schedule=None, **kw):
    """An ``EPNetwork`` for inputs of shape ``in_shape`` = (C, H, W) and ``n_classes`` classes.

    ``width`` scales the channel / unit counts (1.0 = the preset's own). ``init_scale`` and
    ``schedule`` default per preset (see the module docstring: deep presets 3 and
    ``'alternating'`` with ``hardsigmoid_half``; the others 1 and ``'synchronous'``). Other
    keywords (T1, T2, beta, nudging) go to ``EPNetwork``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (--preset); choose one of {', '.join(PRESETS)}")
    if activation not in ACTIVATION_GAIN:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION_GAIN)}, got {activation!r}")
    in_shape = tuple(int(v) for v in in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"build_network needs in_shape = (C, H, W), got {in_shape}")
    w = 1.0 if width is None else float(width)
    if w <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if init_scale is not None and not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    ch = lambda n: max(1, int(round(n * w)))  # noqa: E731
    deep = name in DEEP_BLOCKS

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
    elif deep:
        specs, block_ends = [], []
        for c, n, pool in DEEP_BLOCKS[name]:
            specs += [(ch(c), 3, 1, 1)] * (n - 1) + [(ch(c), 3, 1, pool)]
            block_ends.append(len(specs) - 1)
        try:
            layers, readout = _conv_stack(in_shape, specs, n_classes)
        except ValueError as e:
            need = "8x8" if name == "deep8" else "32x32"
            raise ValueError(f"preset {name!r} needs inputs of at least {need} pixels; got shape {in_shape}: {e}") \
                from e
    else:  # mlp
        n_in = math.prod(in_shape)
        layers = [EPLinear(n_in, ch(256))]
        readout = nn.Linear(ch(256), n_classes)

    centred_scale = None
    if deep:
        centred_scale = DEEP_GAIN / ACTIVATION_GAIN[activation] if init_scale is None else float(init_scale)
        centred_init_(layers, centred_scale)
    elif init_scale is not None and init_scale != 1.0:
        with torch.no_grad():
            for p in [p for m in list(layers) + [readout] for p in m.parameters()]:
                p.mul_(init_scale)
    if schedule is None:
        schedule = "alternating" if deep else "synchronous"
    net = EPNetwork(*layers, readout=readout, activation=activation, schedule=schedule, **kw)
    net.block_ends = tuple(block_ends) if deep else _pooled_ends(net)
    net.centred_init_scale = centred_scale  # Teacher.like repeats it
    return net


@torch.no_grad()
def centred_init_(layers, scale):
    """The deep presets' initialisation, in place on layers with PyTorch's default weights:
    filters centred per output channel in every layer that reads states (all but the first),
    times ``scale``; zero biases."""
    for i, layer in enumerate(layers):
        w = layer.weight
        if i > 0:  # reads states, which are >= 0: remove the common offset mean(W) * sum(s)
            w.sub_(w.mean(dim=tuple(range(1, w.dim())), keepdim=True))
        w.mul_(scale)
        if layer.bias is not None:
            layer.bias.zero_()


def _pooled_ends(net):
    """Block ends of a network without recorded blocks: its pooled layers, and the top one."""
    ends = [i for i, l in enumerate(net.layers) if getattr(l, "pool", 1) > 1]
    top = len(net.layers) - 1
    return tuple(ends if ends and ends[-1] == top else ends + [top])


def default_signal_layers(net):
    """Where intermediate signals attach by default: the end of every block except the top
    layer (the readout's cost already nudges it). Empty for a one-block network."""
    ends = getattr(net, "block_ends", None) or _pooled_ends(net)
    return [i for i in ends if i != len(net.layers) - 1]


def _layer_channels(layer):
    return layer.out_channels if isinstance(layer, EPConv2d) else layer.out_features


def parse_signal_kinds(text):
    """``"classifier,feature"`` / ``"none"`` / a list -> a tuple of kinds (checked, no repeats)."""
    if text is None:
        return ()
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    parts = [p for p in parts if p]
    if parts in (["none"], []):
        return ()
    bad = [p for p in parts if p not in SIGNAL_KINDS]
    if bad:
        raise ValueError(f"unknown signal kind {bad[0]!r} (--signals); choose from {', '.join(SIGNAL_KINDS)}, "
                         "comma-separated, or 'none'")
    if len(set(parts)) != len(parts):
        raise ValueError(f"--signals lists a kind twice: {text!r}")
    return tuple(parts)


def parse_signal_layers(text, net=None):
    """``"auto"`` or ``"1,3,5"`` (layer indices, negative counts from the end) -> list or "auto"."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return "auto"
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        vals = [int(p) for p in parts if str(p).strip()]
    except ValueError:
        raise ValueError(f"--signal-layers must be 'auto' or comma-separated layer indices, got {text!r}") from None
    if net is not None:
        n = len(net.layers)
        for v in vals:
            if not -n <= v < n:
                raise ValueError(f"--signal-layers: layer {v} is out of range for this network's {n} layers "
                                 f"(0..{n - 1})")
    return vals


def build_signals(net, kinds=("classifier",), layers="auto", lambdas=1.0, tau=4.0, pool_size=1, attach=True):
    """Intermediate error signals for ``net`` (docs/design.md, "Signal kinds"); attached to ``net.signals``
    (replacing any there) unless ``attach=False``. Returns the list of signals.

    - ``kinds``: any of ``"classifier"`` (a ``LocalClassifier`` at each chosen layer),
      ``"feature"`` (a ``FeatureDistillation`` at each chosen layer: 1x1 map to the teacher's
      feature map of the same layer, which has the same shape for ``Teacher.like(net)``) and
      ``"logit"`` (one ``LogitDistillation`` at the readout, temperature ``tau``).
    - ``layers``: ``"auto"`` (``default_signal_layers``: every block end but the top) or a list
      of layer indices.
    - ``lambdas``: one weight for every signal, or one per kind (a list in the order of
      ``kinds``, or a dict kind -> weight).
    """
    from .intermediate import FeatureDistillation, LocalClassifier, LogitDistillation

    kinds = parse_signal_kinds(kinds)
    where = default_signal_layers(net) if layers == "auto" else parse_signal_layers(layers, net)
    n = len(net.layers)
    where = [i + n if i < 0 else i for i in where]
    if isinstance(lambdas, dict):
        missing = [k for k in kinds if k not in lambdas]
        if missing:
            raise ValueError(f"lambdas has no weight for signal kind {missing[0]!r}")
        lam = {k: float(lambdas[k]) for k in kinds}
    elif isinstance(lambdas, (list, tuple)):
        if len(lambdas) == 1:
            lam = {k: float(lambdas[0]) for k in kinds}
        elif len(lambdas) != len(kinds):
            raise ValueError(f"--lambda has {len(lambdas)} values for {len(kinds)} signal kinds "
                             f"({', '.join(kinds) or 'none'}): give one value, or one per kind in that order")
        else:
            lam = {k: float(v) for k, v in zip(kinds, lambdas)}
    else:
        lam = {k: float(lambdas) for k in kinds}
    if any(k != "logit" for k in kinds) and not where:
        raise ValueError("no layer to attach intermediate signals to: this network has a single block; "
                         "give --signal-layers explicitly")
    sigs = []
    for kind in kinds:
        if kind == "logit":
            if net.readout is None:
                raise ValueError("logit distillation needs a network with a readout")
            sigs.append(LogitDistillation("readout", weight=lam[kind], tau=tau))
            continue
        for i in where:
            layer = net.layers[i]
            c = _layer_channels(layer)
            if kind == "classifier":
                if net.n_classes is None:
                    raise ValueError("a local classifier needs to know the number of classes")
                sigs.append(LocalClassifier(i, c, net.n_classes, weight=lam[kind],
                                            pool_size=pool_size if isinstance(layer, EPConv2d) else 1))
            else:
                sigs.append(FeatureDistillation(i, c, weight=lam[kind], conv=isinstance(layer, EPConv2d)))
    if attach:
        p = next(net.parameters())
        net.signals = nn.ModuleList(sigs).to(device=p.device, dtype=p.dtype)
    return sigs
