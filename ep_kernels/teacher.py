"""A feed-forward teacher of the same topology as an EP network, trained by backprop, for
the distillation signals (docs/design.md, "The teacher").

The teacher runs each synapse once, bottom-up: ``h_l = sigma(a_l(h_{l-1}))`` with the EP
network's own activation, so its feature map ``h_l`` has exactly the shape of the EP state
``s_l`` and ``FeatureDistillation`` can match them through a 1x1 map. Its targets are
``{"features": {l: h_l}, "logits": readout(h_L)}``, the format ``ep_backward(teacher=...)``
takes.

Training it by backprop is the application's (``ep_kernels.app.teacher.train_teacher``); this
module needs only torch.
"""
import copy
import json

import torch
import torch.nn as nn

from .relaxation import ACTIVATION_GAIN


class Teacher(nn.Module):
    def __init__(self, layers, readout, activation="hardsigmoid_half"):
        super().__init__()
        if activation not in ACTIVATION_GAIN:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_GAIN)}, got {activation!r}")
        self.layers = nn.ModuleList(layers)
        self.readout = readout
        self.activation = activation

    @classmethod
    def like(cls, net, seed=None):
        """A freshly initialised teacher with ``net``'s topology (same layer classes and
        arguments: EP layers' ``forward`` is the feed-forward synapse ``P(W * x + b)``), and
        for a deep preset its initialisation scheme (``models.centred_init_``)."""
        if net.readout is None:
            raise ValueError("a teacher needs an EP network with a readout (cross-entropy mode)")
        if seed is not None:
            torch.manual_seed(seed)
        layers = [copy.deepcopy(l) for l in net.layers]
        readout = copy.deepcopy(net.readout)
        for m in layers + [readout]:
            m.reset_parameters()
        scale = getattr(net, "centred_init_scale", None)
        if scale is not None:  # a deep preset: the same initialisation scheme as the EP network
            from .models import centred_init_

            centred_init_(layers, scale)
        return cls(layers, readout, net.activation)

    def forward(self, x):
        """Logits only (so the teacher trains like any classifier)."""
        return self.targets(x)["logits"]

    def targets(self, x):
        gain = ACTIVATION_GAIN[self.activation]
        feats, h = {}, x
        for l, layer in enumerate(self.layers):
            h = torch.clamp(gain * layer(h), 0.0, 1.0)
            feats[l] = h
        return {"features": feats, "logits": self.readout(h.flatten(1))}


def save_teacher(teacher, path, meta=None):
    """State dict plus what is needed to rebuild it; loaded without executing code."""
    torch.save({"model": teacher.state_dict(), "activation": teacher.activation,
                "meta": json.dumps(meta or {})}, path)


def load_teacher(path, net):
    """A teacher with ``net``'s topology and the weights saved at ``path``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    teacher = Teacher.like(net)
    teacher.activation = ckpt.get("activation", teacher.activation)
    try:
        teacher.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"teacher at {path} does not match this network's topology: {e}") from None
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
