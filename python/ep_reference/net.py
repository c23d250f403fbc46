"""`ReferenceNet`: a plain description of an EP network (docs/design.md, "The energy and the dynamics").

It holds detached clones of the parameter tensors, named as ``named_parameters()`` of an
``EPNetwork`` names them (``layers.<i>.weight``, ``layers.<i>.bias``, ``readout.weight``,
``readout.bias``, and for intermediate error signals ``signals.<i>.head.weight/bias`` or
``signals.<i>.map.weight/bias``), so the reference computes its own gradients and its results
can be compared name by name with the fast path. No module, no ep_kernels import: only tensors.
"""
from dataclasses import dataclass
from typing import Optional

from torch import nn

GAINS = {"hardsigmoid": 1.0, "hardsigmoid_half": 0.5}
# How a step updates the layers: all at once from the same old states, or the odd-numbered
# states s_1, s_3, ... first and then the even-numbered ones from the new odd ones.
SCHEDULES = ("synchronous", "alternating")


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


SIGNAL_KINDS = ("classifier", "feature", "logit")


@dataclass(frozen=True)
class Signal:
    """One intermediate error signal ``weight * L(s_index)`` of the cost (docs/design.md, "Signal kinds").

    ``layer`` is the key as given (an int, possibly negative, or ``"readout"``): teacher
    features are looked up under it. ``index`` is the state it reads (0-based, into the
    states ``s_1 .. s_L``). ``head`` / ``map`` are ``(weight name, bias name or None)`` or None.
    """

    kind: str  # "classifier", "feature" or "logit"
    layer: object
    index: int
    weight: float
    tau: float = 1.0
    pool_size: int = 1
    head: Optional[tuple] = None  # linear head (classifier; logit at a hidden layer)
    map: Optional[tuple] = None  # feature map: 1x1 conv (4-D weight) or linear (2-D weight)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


class ReferenceNet:
    """Layers + optional readout + activation, as parameter tensors.

    ``layers``: list of dicts with ``weight`` (4-D: conv, 2-D: linear), optional ``bias``,
    and for convs optional ``stride, padding, dilation, groups, pool``; ``kind`` is inferred
    from the weight's rank unless given. ``readout``: None (MSE mode: the last state layer is
    the output), or a dict with ``weight``/``bias`` or a ``(weight, bias)`` tuple (CE mode).

    ``signals``: intermediate error signals, a list of dicts with ``kind`` ("classifier",
    "feature", "logit"), ``layer`` (state index, negative counts from the end; ``"readout"``
    for logit distillation through the readout), ``weight`` (lambda > 0), and as the kind
    needs: ``head`` (weight/bias dict or tuple: linear head on the average-pooled state,
    classifier and hidden-layer logit distillation), ``pool_size`` (adaptive average pool
    side for 4-D states, default 1), ``map`` (feature distillation: a (C_t, C, 1, 1) 1x1
    convolution or a (F_t, F) linear weight, and bias), ``tau`` (logit distillation).
    Their parameters are named ``signals.<i>.head.*`` / ``signals.<i>.map.*``.

    ``schedule``: ``"synchronous"`` or ``"alternating"`` (see ``dynamics.step``).
    """

    def __init__(self, layers, readout=None, activation="hardsigmoid", signals=(), schedule="synchronous"):
        if activation not in GAINS:
            raise ValueError(f"activation must be one of {sorted(GAINS)}, got {activation!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.activation = activation
        self.schedule = schedule
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
        self.signals = []
        for i, spec in enumerate(signals):
            self.signals.append(self._signal(i, dict(spec)))

    def _head(self, i, part, spec):
        """Register ``signals.<i>.<part>.weight/bias`` from a dict or tuple; return the names."""
        if isinstance(spec, (tuple, list)):
            spec = dict(zip(("weight", "bias"), spec))
        w, b = spec["weight"], spec.get("bias")
        wn = f"signals.{i}.{part}.weight"
        self.params[wn] = w.detach().clone()
        bn = None
        if b is not None:
            bn = f"signals.{i}.{part}.bias"
            self.params[bn] = b.detach().clone()
        return (wn, bn)

    def _signal(self, i, spec):
        kind = spec.pop("kind", None)
        if kind not in SIGNAL_KINDS:
            raise ValueError(f"signals[{i}]: kind must be one of {SIGNAL_KINDS}, got {kind!r}")
        layer = spec.pop("layer", "readout" if kind == "logit" else None)
        weight = float(spec.pop("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"signals[{i}]: weight (lambda) must be positive, got {weight!r}")
        L = len(self.layers)
        if layer == "readout":
            if kind != "logit":
                raise ValueError(f"signals[{i}]: only logit distillation attaches to the readout")
            if self.mode != "ce":
                raise ValueError(f"signals[{i}]: logit distillation at the readout needs a readout (CE mode)")
            index = L - 1
        elif isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"signals[{i}]: layer must be an int state index or 'readout', got {layer!r}")
        else:
            index = layer + L if layer < 0 else layer
            if not 0 <= index < L:
                raise ValueError(f"signals[{i}] ({kind}): layer {layer} is out of range for {L} layers")
        tau = float(spec.pop("tau", 1.0))
        if kind == "logit" and not tau > 0:
            raise ValueError(f"signals[{i}]: tau must be positive, got {tau!r}")
        pool_size = int(spec.pop("pool_size", 1))
        head = spec.pop("head", None)
        mapping = spec.pop("map", None)
        if kind == "classifier" or (kind == "logit" and layer != "readout"):
            if head is None:
                raise ValueError(f"signals[{i}] ({kind}): needs a head (weight, bias)")
            head = self._head(i, "head", head)
        elif head is not None:
            raise ValueError(f"signals[{i}] ({kind} at {layer!r}): takes no head")
        if kind == "feature":
            if mapping is None:
                raise ValueError(f"signals[{i}] (feature): needs a map (weight, bias)")
            mapping = self._head(i, "map", mapping)
            if self.params[mapping[0]].dim() not in (2, 4):
                raise ValueError(f"signals[{i}]: the map weight must be 2-D (linear) or 4-D (1x1 conv)")
            if self.params[mapping[0]].dim() == 4 and tuple(self.params[mapping[0]].shape[2:]) != (1, 1):
                raise ValueError(f"signals[{i}]: the map must be a 1x1 convolution")
        elif mapping is not None:
            raise ValueError(f"signals[{i}] ({kind}): takes no map")
        if spec:
            raise ValueError(f"signals[{i}]: unexpected keys {sorted(spec)}")
        return Signal(kind, layer, index, weight, tau, pool_size, head, mapping)

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
        signals = [_signal_spec(i, sig) for i, sig in enumerate(getattr(net, "signals", None) or ())]
        return cls(specs, readout, activation=getattr(net, "activation", "hardsigmoid"), signals=signals,
                   schedule=getattr(net, "schedule", "synchronous"))

    @property
    def layer_param_names(self):
        """Names of the parameters inside Phi (everything but the readout)."""
        return [n for n in self.params if n.startswith("layers.")]

    @property
    def readout_param_names(self):
        return [n for n in self.params if n.startswith("readout.")]

    @property
    def signal_param_names(self):
        """Parameters of the intermediate signals' heads and maps (training-only)."""
        return [n for n in self.params if n.startswith("signals.")]

    @property
    def head_param_names(self):
        """Everything outside Phi: readout, heads and maps (learned by their ordinary gradient)."""
        return [n for n in self.params if not n.startswith("layers.")]

    @property
    def needs_teacher(self):
        return any(sig.kind in ("feature", "logit") for sig in self.signals)

    def to(self, *args, **kwargs):
        """A copy with every tensor moved/cast by ``Tensor.to(*args, **kwargs)``."""
        new = object.__new__(ReferenceNet)
        new.__dict__.update(self.__dict__)
        new.params = {n: p.to(*args, **kwargs) for n, p in self.params.items()}
        new.layers = list(self.layers)
        new.signals = list(self.signals)
        return new

    def __repr__(self):
        body = ", ".join(f"{L.kind}{'/pool' + str(L.pool) if L.pool > 1 else ''}" for L in self.layers)
        sig = "".join(f", {S.kind}@{S.layer}" for S in self.signals)
        return (f"ReferenceNet([{body}], mode={self.mode!r}, activation={self.activation!r}, "
                f"schedule={self.schedule!r}{sig})")


def _linear_params(i, part, mod):
    if not isinstance(mod, nn.Linear):
        raise TypeError(f"signals[{i}].{part}: expected nn.Linear, got {type(mod).__name__}")
    return dict(weight=mod.weight, bias=mod.bias)


def _signal_spec(i, sig):
    """A plain spec from a signal module, duck-typed: ``kind, layer, weight`` and, as the kind
    needs, ``tau, pool_size`` and ``head`` (nn.Linear) / ``map`` (1x1 nn.Conv2d or nn.Linear)."""
    kind = getattr(sig, "kind", None)
    spec = dict(kind=kind, layer=sig.layer, weight=sig.weight)
    if kind in ("classifier", "logit"):
        spec["pool_size"] = int(getattr(sig, "pool_size", 1))
        head = getattr(sig, "head", None)
        if head is not None:
            spec["head"] = _linear_params(i, "head", head)
    if kind == "logit":
        spec["tau"] = float(sig.tau)
    if kind == "feature":
        m = sig.map
        if isinstance(m, nn.Conv2d):
            if (tuple(m.kernel_size), tuple(m.stride), m.groups, tuple(m.dilation)) != ((1, 1), (1, 1), 1, (1, 1)) \
                    or m.padding not in ((0, 0), "valid"):
                raise ValueError(f"signals[{i}].map: only a plain 1x1 convolution is part of the model")
            spec["map"] = dict(weight=m.weight, bias=m.bias)
        else:
            spec["map"] = _linear_params(i, "map", m)
    return spec
