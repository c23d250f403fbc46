"""The relaxation itself: plans and state buffers, the nudges, one step of each schedule, a
phase's loop and its convergence check. A leaf module: the eager engine (``engine``) and the
CUDA-graph runner (``cuda_graphs``) both import it, and it imports neither.

Notation as in docs/design.md, "The energy and the dynamics". ``layers[l]`` is the synapse
from ``s_l`` (``s_0 = x``) to ``s_{l+1}``; ``states[l]`` is ``s_{l+1}``. A step updates every
state once, on one of two schedules: synchronous (every layer's drive, top-down and nudge from
the same old states) or alternating (``s_1, s_3, ...`` first, then ``s_2, s_4, ...`` from the
new ones), see ``STEPS``. Everything here runs under ``torch.no_grad`` through
``ep_kernels.ops``, so the backend is the one ``ep_kernels.use_backend`` chose.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops

ACTIVATION_GAIN = {"hardsigmoid": 1.0, "hardsigmoid_half": 0.5}
NUDGING = ("symmetric", "one-sided", "random-sign")


class RelaxationDiverged(FloatingPointError):
    """A state became NaN during relaxation (too large weights, learning rate, or beta)."""


@dataclass
class PhaseReport:
    """How a phase ended: steps taken and each layer's last max |s_t - s_{t-1}|."""
    steps: int
    residual: list
    converged: bool = False

    def as_dict(self):
        return {"steps": self.steps, "residual": self.residual, "converged": self.converged}


class Plan:
    """Shapes of one network for one input shape, and the state buffers for it.

    Built once per (input shape, dtype, device) and cached by the network, so relaxation
    allocates its states once, not per step: each layer has two buffers, swapped each step.
    """

    def __init__(self, layers, x_shape, dtype, device):
        self.x_shape = tuple(x_shape)
        self.state_shapes = []  # per-example shapes, s_1 .. s_L
        in_shape = tuple(x_shape[1:])
        self.in_shapes = []
        for i, layer in enumerate(layers):
            self.in_shapes.append(in_shape)
            try:
                in_shape = tuple(layer.state_shape(in_shape))
            except ValueError as e:
                raise ValueError(f"layer {i} ({type(layer).__name__}): {e}") from None
            self.state_shapes.append(in_shape)
        self.dtype, self.device = dtype, device
        self._buffers = {}

    def buffers(self, batch):
        """Two zeroed-once buffer sets for a batch size (the nudged phases use 2N)."""
        if batch not in self._buffers:
            self._buffers[batch] = [
                [torch.zeros((batch,) + s, dtype=self.dtype, device=self.device) for s in self.state_shapes]
                for _ in range(2)
            ]
        return self._buffers[batch]


def output_nudge(mode, readout, s_last, y, beta):
    """``-beta * dC_out,n/ds_L`` per example; ``beta`` is a float or an (N,) tensor."""
    if mode == "ce":
        logits = readout(s_last.flatten(1))
        err = torch.softmax(logits, dim=1)
        err[torch.arange(y.shape[0], device=y.device), y] -= 1.0
        g = (err @ readout.weight).view_as(s_last)
    else:
        g = s_last - F.one_hot(y, s_last[0].numel()).to(s_last.dtype).view_as(s_last)
    return g.mul_(-_per_example(beta, g))


def _per_example(beta, like):
    if isinstance(beta, torch.Tensor):
        return beta.view((-1,) + (1,) * (like.dim() - 1))
    return beta


def signal_nudges(signals, readout, states, y, teacher, beta):
    """``-beta * lambda_l * dL_l/ds_l`` for every intermediate signal, summed per layer
    (a dict layer -> tensor). The heads are tiny, so autograd per step is cheap and exact."""
    out = {}
    L = len(states)
    with torch.enable_grad():
        for sig in signals:
            l = sig.state_index(L)
            s = states[l].detach().requires_grad_(True)
            loss = sig.loss(s, y, teacher, readout).sum() * sig.weight
            (g,) = torch.autograd.grad(loss, s)
            g = g.mul_(-_per_example(beta, g))
            out[l] = g if l not in out else out[l] + g
    return out


def make_nudge_fn(net, y, teacher, beta):
    """The per-layer nudges of the nudged phases, as a function of the current states."""
    L = len(net.layers)

    def nudges(states):
        per_layer = [None] * L
        per_layer[-1] = output_nudge(net.mode, net.readout, states[-1], y, beta)
        for l, g in signal_nudges(net.signals, net.readout, states, y, teacher, beta).items():
            per_layer[l] = g if per_layer[l] is None else per_layer[l] + g
        return per_layer

    return nudges


def synchronous_step(layers, first_drive, states, out, shapes, prepared, nudge_fn, gain, cache=None):
    """One synchronous update from ``states`` into ``out``: every layer's drive, top-down and
    nudge come from the same old states. Returns each layer's max |change| (0-dim tensors).
    ``cache`` is unused (the alternating step's signature)."""
    L = len(layers)
    drives = [first_drive] + [layers[l].drive(states[l - 1], prepared[l]) for l in range(1, L)]
    nudge = nudge_fn(states) if nudge_fn is not None else [None] * L
    changes = []
    for l in range(L):
        top = None
        if l + 1 < L:
            top = layers[l + 1].top_down(states[l + 1], drives[l + 1][1], shapes[l + 1], prepared[l + 1])
        changes.append(ops.state_update(drives[l][0], top, nudge[l], states[l], gain, out[l]))
    return changes


def alternating_step(layers, first_drive, states, out, shapes, prepared, nudge_fn, gain, cache=None):
    """One alternating update from ``states`` into ``out``: first ``s_1, s_3, ...`` (indices
    0, 2, ...) from the old states, then ``s_2, s_4, ...`` from the new odd ones.

    Why: the layers of one parity don't interact, so each half-step maximises
    ``F = Phi - |s|^2 / (2 gain)`` exactly over those layers (``clamp(gain * dPhi/ds)`` is
    F's maximiser over the box [0, 1]; with max-pooling, that of a minorant of F touching it
    at the current state), and F never decreases. Synchronous updates of strongly coupled
    layers can instead fall into a period-2 oscillation and never converge (measured on deep
    presets). The fixed points are the same, and so is the EP gradient at one; with max-pooling
    there may be several, and the two schedules may settle in different ones.

    Same cost as a synchronous step: each layer's drive is computed once. The drives of the
    second half's layers (from the first half's states) are still valid at the next step's
    first half, where their pooling argmax is needed for the top-down; ``cache`` (a dict)
    carries them across steps. Without it (or on the first step) they are computed here.
    """
    L = len(layers)
    nudge = nudge_fn(states) if nudge_fn is not None else [None] * L
    # Each layer's nudge depends on its own state only (docs/design.md, "How signals enter the cost and the nudges"), and a layer of
    # the second half has not moved during the first: one evaluation serves both halves.
    cached = cache.get("second_half", {}) if cache is not None else {}
    drives = [None] * L
    for l in range(1, L, 2):
        # The second half's drives from the first half's old states: needed now only for the
        # pooling argmax of their top-down signal.
        if l in cached:
            drives[l] = cached[l]
        elif getattr(layers[l], "pool", 1) > 1:
            drives[l] = layers[l].drive(states[l - 1], prepared[l])
        else:
            drives[l] = (None, None)
    changes = [None] * L
    cur = list(states)
    for half in (0, 1):
        for l in range(half, L, 2):
            drives[l] = first_drive if l == 0 else layers[l].drive(cur[l - 1], prepared[l])
        for l in range(half, L, 2):
            top = None
            if l + 1 < L:
                top = layers[l + 1].top_down(cur[l + 1], drives[l + 1][1], shapes[l + 1], prepared[l + 1])
            changes[l] = ops.state_update(drives[l][0], top, nudge[l], cur[l], gain, out[l])
        for l in range(half, L, 2):
            cur[l] = out[l]
    if cache is not None:
        cache["second_half"] = {l: drives[l] for l in range(1, L, 2)}
    return changes


STEPS = {"synchronous": synchronous_step, "alternating": alternating_step}
SCHEDULES = tuple(STEPS)


def relax(layers, x, states, steps, gain, *, first_drive=None, nudge_fn=None, tol=None, check_every=10,
          spare=None, phase="free", prepared=None, schedule="synchronous"):
    """Run ``steps`` updates from ``states``; returns (states, PhaseReport).

    ``schedule``: ``"synchronous"`` (every layer from the same old states) or
    ``"alternating"`` (odd-numbered states, then even-numbered ones; see ``alternating_step``).
    ``states`` and ``spare`` are lists of same-shaped buffers; the result is in one of them.
    ``first_drive`` (the constant drive of layer 0 for the clamped ``x``) is computed once
    here when not given. ``nudge_fn(states)`` gives a per-layer list of nudges (or None).
    ``prepared``: per layer, the weights as relaxation uses them (``prepare_layers``).
    With ``tol`` the phase stops once every layer's max change is below it (tested every
    ``check_every`` steps: a host sync each time).
    """
    L = len(layers)
    step = STEPS[schedule]
    if prepared is None:
        prepared = prepare_layers(layers)
    if first_drive is None:
        first_drive = layers[0].drive(x, prepared[0])
    if spare is None:
        spare = [torch.empty_like(s) for s in states]
    shapes = [tuple(x.shape[1:])] + [tuple(s.shape[1:]) for s in states[:-1]]
    res = [0.0] * L
    converged = False
    cache = {}
    t = 0
    for t in range(1, steps + 1):
        changes = step(layers, first_drive, states, spare, shapes, prepared, nudge_fn, gain, cache)
        states, spare = spare, states
        if t % check_every == 0 or t == steps:  # the last step is always checked, so res is final
            res = torch.stack(changes).tolist()
            if check_residuals(res, phase, t, tol):
                converged = True
                break
    return states, PhaseReport(steps=t if steps > 0 else 0, residual=res, converged=converged)


def start_states(bufs, init=None):
    """Set a phase's state buffers to zeros, or to ``init`` (one tensor per layer)."""
    for i, b in enumerate(bufs):
        b.zero_() if init is None else b.copy_(init[i])


def default_check_every(device):
    """Steps between convergence checks when none is given: every step on CPU, where reading
    the per-layer changes costs microseconds against a step's milliseconds, so a phase stops at
    the first converged step; every 10 steps on a GPU, where each check is a host sync (the
    CUDA-graph runner captures the steps between two checks as one graph)."""
    return 1 if getattr(device, "type", device) == "cpu" else 10


def check_residuals(res, phase, step, tol):
    """Raise on a NaN layer change; return whether every layer's change is below ``tol``.
    Shared by the eager loop and the CUDA-graph runner, so both stop and fail alike."""
    for l, r in enumerate(res):
        if math.isnan(r):
            raise RelaxationDiverged(
                f"{phase} phase: state of layer {l} became NaN at step {step}; check the input, "
                "the weights and beta (a learning rate too large often causes this)")
    return tol is not None and max(res) < tol


def prepare_layers(layers, compute_dtype=None):
    """Each layer's weights as relaxation uses them, once per call (weights are fixed during
    relaxation): packed for the compiled top-down kernel, and cast to ``compute_dtype``
    (bfloat16 convolutions with float32 states and state updates) when one is given."""
    return [layer.prepare(compute_dtype) for layer in layers]
