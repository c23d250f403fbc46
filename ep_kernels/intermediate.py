"""Intermediate error signals (docs/design.md, "Intermediate error signals"): extra terms ``lambda_l * L_l(s_l)`` of
the cost ``C(s)`` that nudge hidden layers directly, so deep EP networks do not suffer
vanishing nudges.

Each signal is a small module attached to one state layer (``layer`` = index into
``net.layers``: the state that layer produces). During the nudged phases the layer gets the
extra drive ``-beta * weight * dL/ds_l``; the signal's own parameters (head, map) get the
ordinary gradient of ``weight * L`` averaged over the nudged states. The free phase and
inference never use them. All losses are per example (shape (N,)); updates use batch means.

Distillation targets come from a teacher (``ep_kernels.teacher``): ``ep_backward(...,
teacher=...)`` takes a dict ``{"features": {layer: tensor}, "logits": tensor}`` or a callable
returning one for ``x``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("classifier", "feature", "logit")


class IntermediateSignal(nn.Module):
    kind = None

    def __init__(self, layer, weight=1.0):
        super().__init__()
        if layer != "readout" and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise TypeError(f"layer must be an int index into the network's layers, got {layer!r}")
        if not weight > 0:
            raise ValueError(f"weight (lambda) must be positive, got {weight!r}")
        self.layer = layer
        self.weight = float(weight)

    def state_index(self, n_layers):
        """The state this signal reads (a negative ``layer`` counts from the end)."""
        if self.layer == "readout":
            return n_layers - 1
        i = self.layer + n_layers if self.layer < 0 else self.layer
        if not 0 <= i < n_layers:
            raise ValueError(f"{type(self).__name__}: layer {self.layer} is out of range for {n_layers} layers")
        return i

    def loss(self, s, y, teacher, readout=None):  # pragma: no cover - interface
        raise NotImplementedError

    def extra_repr(self):
        return f"layer={self.layer}, weight={self.weight}"


def _pooled(s, pool_size):
    # Average-pool a conv state to pool_size x pool_size (docs/design.md, "Signal kinds").
    return F.adaptive_avg_pool2d(s, pool_size).flatten(1) if s.dim() == 4 else s.flatten(1)


class LocalClassifier(IntermediateSignal):
    """``CE(h(avgpool(s_l)), y)`` with a linear head ``h``."""

    kind = "classifier"

    def __init__(self, layer, in_channels, n_classes, weight=1.0, pool_size=1):
        super().__init__(layer, weight)
        self.pool_size = int(pool_size)
        self.head = nn.Linear(in_channels * self.pool_size ** 2, n_classes)

    def logits(self, s):
        return self.head(_pooled(s, self.pool_size))

    def loss(self, s, y, teacher, readout=None):
        return F.cross_entropy(self.logits(s), y, reduction="none")


class FeatureDistillation(IntermediateSignal):
    """``1/2 ||M(s_l) - t_l(x)||^2`` with ``M`` a learned 1x1 convolution (linear for 1-D states)."""

    kind = "feature"

    def __init__(self, layer, channels, teacher_channels=None, weight=1.0, conv=True):
        super().__init__(layer, weight)
        if layer == "readout":
            raise ValueError("FeatureDistillation needs a hidden layer index, not 'readout'")
        tc = channels if teacher_channels is None else teacher_channels
        self.map = nn.Conv2d(channels, tc, 1) if conv else nn.Linear(channels, tc)
        with torch.no_grad():  # start as the identity where shapes allow: s_l already mimics t_l
            if tc == channels:
                self.map.weight.copy_(torch.eye(channels).view_as(self.map.weight))
                self.map.bias.zero_()

    def loss(self, s, y, teacher, readout=None):
        t = _teacher_part(teacher, "features", self.layer)
        if isinstance(self.map, nn.Linear) and s.dim() != 2:
            raise ValueError(f"FeatureDistillation(conv=False) needs a 1-D state per example, layer {self.layer} "
                             f"has shape {tuple(s.shape[1:])}; use conv=True (a 1x1 convolution)")
        m = self.map(s)
        if m.shape != t.shape:
            raise ValueError(f"feature distillation at layer {self.layer}: mapped state {tuple(m.shape)} "
                             f"!= teacher features {tuple(t.shape)}")
        return 0.5 * (m - t).pow(2).flatten(1).sum(1)


class LogitDistillation(IntermediateSignal):
    """``tau^2 KL(softmax(t/tau) || softmax(h(s)/tau))`` against the teacher's logits ``t``.

    ``layer="readout"``: ``h`` is the network's readout on ``s_L`` (no parameters of its own).
    An int ``layer``: ``h`` is a linear head on that (average-pooled) state.
    """

    kind = "logit"

    def __init__(self, layer="readout", in_channels=None, n_classes=None, weight=1.0, tau=4.0, pool_size=1):
        super().__init__(layer, weight)
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau!r}")
        self.tau = float(tau)
        self.pool_size = int(pool_size)
        self.head = None
        if layer != "readout":
            if in_channels is None or n_classes is None:
                raise ValueError("LogitDistillation at a hidden layer needs in_channels and n_classes for its head")
            self.head = nn.Linear(in_channels * self.pool_size ** 2, n_classes)

    def loss(self, s, y, teacher, readout=None):
        if self.head is None:
            if readout is None:
                raise ValueError("LogitDistillation(layer='readout') needs a network with a readout")
            logits = readout(s.flatten(1))
        else:
            logits = self.head(_pooled(s, self.pool_size))
        return kd_loss(logits, _teacher_part(teacher, "logits"), self.tau)


def kd_loss(logits, teacher_logits, tau):
    """Per example ``tau^2 KL(softmax(t/tau) || softmax(logits/tau))``."""
    logp = F.log_softmax(logits / tau, dim=1)
    logq = F.log_softmax(teacher_logits / tau, dim=1)
    return tau * tau * (logq.exp() * (logq - logp)).sum(1)


def _teacher_part(teacher, key, layer=None):
    if teacher is None:
        raise ValueError("a distillation signal needs teacher targets: pass teacher=... to ep_backward")
    part = teacher.get(key)
    if part is None:
        what = "logits" if key == "logits" else f"features (for layer {layer})"
        raise ValueError(f"the teacher targets have no {key!r} entry: a distillation signal needs the teacher's "
                         f"{what}")
    if layer is None:
        return part
    if layer not in part:
        raise ValueError(f"the teacher gave no features for layer {layer} (has {sorted(part)})")
    return part[layer]
