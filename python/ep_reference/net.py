"""`ReferenceNet`: a plain description of an EP network (DESIGN.md section 2).

It holds detached clones of the parameter tensors, named as ``named_parameters()`` of an
``EPNetwork`` names them (``layers.<i>.weight``, ``layers.<i>.bias``, ``readout.weight``,
``readout.bias``), so the reference computes its own gradients and its results can be
compared name by name with the fast path. No module, no ep_kernels import: only tensors.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

GAINS = {"hardsigmoid": 1.0, "hardsigmoid_half": 0.5}


@dataclass(frozen=True)
class Layer:
    """One synapse s_{l-1} -> s_l. ``weight``/``bias`` are parameter names (bias may be None)."""

    kind: str  # "conv" or "linear"
    weight: str
    bias: Optional[str]
    stride: tuple = (1, 1)
    padding: object = (0, 0)  # tuple, or a string F.conv2d accepts ("same", "valid")
    dilation: tuple = (1, 1)
    groups: int = 1
    pool: int = 1  # max-pool k x k, stride k; 1 = identity


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


class ReferenceNet:
    """Layers + optional readout + activation, as parameter tensors.

    ``layers``: list of dicts with ``weight`` (4-D: conv, 2-D: linear), optional ``bias``,
    and for convs optional ``stride, padding, dilation, groups, pool``; ``kind`` is inferred
    from the weight's rank unless given. ``readout``: None (MSE mode: the last state layer is
    the output), or a dict with ``weight``/``bias`` or a ``(weight, bias)`` tuple (CE mode).
    """

    def __init__(self, layers, readout=None, activation="hardsigmoid"):
        if activation not in GAINS:
            raise ValueError(f"activation must be one of {sorted(GAINS)}, got {activation!r}")
        self.activation = activation
        self.gain = GAINS[activation]
        self.params = {}
        self.layers = []
        for i, spec in enumerate(layers):
            spec = dict(spec)
            w = spec.pop("weight")
            b = spec.pop("bias", None)
            kind = spec.pop("kind", "conv" if w.dim() == 4 else "linear")
            self.params[f"layers.{i}.weight"] = w.detach().clone()
            if b is not None:
                self.params[f"layers.{i}.bias"] = b.detach().clone()
            bname = f"layers.{i}.bias" if b is not None else None
            if kind == "conv":
                pad = spec.pop("padding", 0)
                self.layers.append(Layer(
                    "conv", f"layers.{i}.weight", bname,
                    stride=_pair(spec.pop("stride", 1)),
                    padding=pad if isinstance(pad, str) else _pair(pad),
                    dilation=_pair(spec.pop("dilation", 1)),
                    groups=int(spec.pop("groups", 1)),
                    pool=int(spec.pop("pool", 1)),
                ))
            elif kind == "linear":
                self.layers.append(Layer("linear", f"layers.{i}.weight", bname))
            else:
                raise ValueError(f"layer {i}: unknown kind {kind!r}")
            if spec:
                raise ValueError(f"layer {i}: unexpected keys {sorted(spec)}")
        if not self.layers:
            raise ValueError("a network needs at least one layer")
        if readout is not None:
            if isinstance(readout, (tuple, list)):
                readout = dict(zip(("weight", "bias"), readout))
            self.params["readout.weight"] = readout["weight"].detach().clone()
            if readout.get("bias") is not None:
                self.params["readout.bias"] = readout["bias"].detach().clone()
        self.mode = "ce" if readout is not None else "mse"

    @classmethod
    def from_module(cls, net):
        """Read ``net.layers`` (nn.Conv2d with int ``pool``, or nn.Linear), ``net.readout``
        (nn.Linear or None) and ``net.activation`` by duck typing; tensors are cloned."""
        specs = []
        for i, layer in enumerate(net.layers):
            if isinstance(layer, nn.Conv2d):
                if getattr(layer, "padding_mode", "zeros") != "zeros":
                    raise ValueError(f"layer {i}: only zero padding is part of the model")
                specs.append(dict(kind="conv", weight=layer.weight, bias=layer.bias,
                                  stride=layer.stride, padding=layer.padding,
                                  dilation=layer.dilation, groups=layer.groups,
                                  pool=int(getattr(layer, "pool", 1) or 1)))
            elif isinstance(layer, nn.Linear):
                specs.append(dict(kind="linear", weight=layer.weight, bias=layer.bias))
            else:
                raise TypeError(f"layer {i}: expected nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        ro = getattr(net, "readout", None)
        readout = None if ro is None else dict(weight=ro.weight, bias=ro.bias)
        return cls(specs, readout, activation=getattr(net, "activation", "hardsigmoid"))

    @property
    def layer_param_names(self):
        """Names of the parameters inside Phi (everything but the readout)."""
        return [n for n in self.params if n.startswith("layers.")]

    @property
    def readout_param_names(self):
        return [n for n in self.params if n.startswith("readout.")]

    def to(self, *args, **kwargs):
        """A copy with every tensor moved/cast by ``Tensor.to(*args, **kwargs)``."""
        new = object.__new__(ReferenceNet)
        new.__dict__.update(self.__dict__)
        new.params = {n: p.to(*args, **kwargs) for n, p in self.params.items()}
        new.layers = list(self.layers)
        return new

    def __repr__(self):
        body = ", ".join(f"{L.kind}{'/pool' + str(L.pool) if L.pool > 1 else ''}" for L in self.layers)
        return f"ReferenceNet([{body}], mode={self.mode!r}, activation={self.activation!r})"
