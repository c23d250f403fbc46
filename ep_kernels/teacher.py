"""A feed-forward teacher of the same topology as an EP network, trained by backprop, for
the distillation signals of DESIGN.md section 4.

The teacher runs each synapse once, bottom-up: ``h_l = sigma(a_l(h_{l-1}))`` with the EP
network's own activation, so its feature map ``h_l`` has exactly the shape of the EP state
``s_l`` and ``FeatureDistillation`` can match them through a 1x1 map. Its targets are
``{"features": {l: h_l}, "logits": readout(h_L)}``, the format ``ep_backward(teacher=...)``
takes.
"""
import copy
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def train_teacher(teacher, data, epochs=10, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64, seed=0,
                  progress=True, log=print):
    """Backprop training of ``teacher`` on ``data`` (an ``ep_kernels.data.Dataset``).
    Returns the per-epoch test accuracies."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(teacher.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    n = len(data.y_train)
    accs = []
    for epoch in range(epochs):
        teacher.train()
        perm = torch.randperm(n, generator=g)
        bar = tqdm(range(0, n, batch_size), desc=f"teacher epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        for i in bar:
            idx = perm[i:i + batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            if data.augment is not None:
                x = data.augment(x, g)
            loss = F.cross_entropy(teacher(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        sched.step()
        accs.append(evaluate(teacher, data.x_test, data.y_test, batch_size))
        log(f"teacher epoch {epoch + 1}/{epochs}: test accuracy {100 * accs[-1]:.2f}%")
    return accs


@torch.no_grad()
def evaluate(teacher, x, y, batch_size=256):
    teacher.eval()
    correct = sum((teacher(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(y), batch_size))
    return correct / max(1, len(y))


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
