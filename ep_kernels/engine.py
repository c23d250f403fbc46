"""The EP algorithm, in one place: relaxation phases, the EP gradient, and BPTT.

Notation as in DESIGN.md section 2. ``layers[l]`` is the synapse from ``s_l`` (``s_0 = x``)
to ``s_{l+1}``; ``states[l]`` is ``s_{l+1}``. A step updates every state once, on one of two schedules:
synchronous (every layer's drive, top-down and nudge from the same old states) or alternating
(``s_1, s_3, ...`` first, then ``s_2, s_4, ...`` from the new ones), see ``STEPS``.

Everything here except :func:`bptt` runs under ``torch.no_grad`` and through
``ep_kernels.ops``, so the backend (reference or compiled) is chosen by ``_backend``.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cuda_graphs, ops

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


@dataclass
class EPResult:
    loss: torch.Tensor
    logits: torch.Tensor
    diagnostics: dict = field(default_factory=dict)
    states: dict = None  # {"free", "plus", "minus"} lists of states, when asked for


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
    # Each layer's nudge depends on its own state only (DESIGN.md section 4), and a layer of
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


def free_phase(layers, plan, x, T, gain, tol=None, check_every=10, first_drive=None, prepared=None,
               schedule="synchronous"):
    """T steps at beta = 0 from zero states. Returns (s*, report); s* lives in the plan's
    buffers, so copy it before the next phase of the same batch size if you keep it."""
    if cuda_graphs.active_for(x):  # CUDA tensors: the same steps, as captured CUDA graphs
        return cuda_graphs.free_phase(layers, plan, x, T, gain, tol, check_every, first_drive, prepared,
                                      schedule=schedule)
    bufs, spare = plan.buffers(x.shape[0])
    for b in bufs:
        b.zero_()
    return relax(layers, x, bufs, T, gain, first_drive=first_drive, tol=tol, check_every=check_every,
                 spare=spare, phase="free", prepared=prepared, schedule=schedule)


def nudged_phase(net, plan, x, y, teacher, s_star, betas, T, gain, tol=None, check_every=10, first_drive=None,
                 prepared=None, schedule="synchronous"):
    """T steps from ``s_star`` with per-example nudging strengths ``betas`` (an (N,) tensor)."""
    if cuda_graphs.active_for(x):  # CUDA tensors: the same steps, as captured CUDA graphs
        return cuda_graphs.nudged_phase(net, plan, x, y, teacher, s_star, betas, T, gain, tol, check_every,
                                        first_drive, prepared, schedule=schedule)
    bufs, spare = plan.buffers(x.shape[0])
    for b, s in zip(bufs, s_star):
        b.copy_(s)
    return relax(net.layers, x, bufs, T, gain, first_drive=first_drive, tol=tol, check_every=check_every,
                 spare=spare, phase="nudged", nudge_fn=make_nudge_fn(net, y, teacher, betas), prepared=prepared,
                 schedule=schedule)


def cost(mode, readout, s_last, y):
    """Mean over the batch of the output cost and the logits (CE) or output state (MSE)."""
    if mode == "ce":
        logits = readout(s_last.flatten(1))
        return F.cross_entropy(logits, y), logits
    out = s_last.flatten(1)
    return 0.5 * (out - F.one_hot(y, out.shape[1]).to(out.dtype)).pow(2).sum(1).mean(), out


def total_cost(net, states, y, teacher):
    """``C(s)`` batch-mean: the output cost plus ``sum_l lambda_l L_l(s_l)``; also returns the
    output cost, the logits and each signal's (unweighted) mean loss."""
    out_loss, logits = cost(net.mode, net.readout, states[-1], y)
    total, aux = out_loss, []
    for sig in net.signals:
        l_sig = sig.loss(states[sig.state_index(len(states))], y, teacher, net.readout).mean()
        aux.append(l_sig)
        total = total + sig.weight * l_sig
    return total, out_loss, logits, aux


def resolve_teacher(net, teacher, x):
    """Teacher targets as a dict, computed once per batch when a callable is given."""
    needs = any(sig.kind in ("feature", "logit") for sig in net.signals)
    if teacher is None:
        if needs:
            raise ValueError("this network has distillation signals: pass teacher=... to ep_backward")
        return None
    if not isinstance(teacher, dict):
        # A Teacher module (its .targets gives features and logits) or any callable.
        fn = getattr(teacher, "targets", teacher)
        if not callable(fn):
            raise TypeError("teacher must be a dict of targets, a Teacher, or a callable returning targets")
        with torch.no_grad():
            teacher = fn(x)
    if not isinstance(teacher, dict):
        raise TypeError("teacher must be a dict {'features': {layer: tensor}, 'logits': tensor} or a callable "
                        "returning one")
    return teacher


def _double_teacher(teacher):
    if teacher is None:
        return None
    out = {}
    for k, v in teacher.items():
        out[k] = {i: torch.cat([t, t]) for i, t in v.items()} if isinstance(v, dict) else torch.cat([v, v])
    return out


def contrastive_update(layers, x, states_a, states_b, x_b, scale):
    """``scale * (dPhi/dtheta(a) - dPhi/dtheta(b))`` into every synapse's ``.grad``.

    The argmax positions are those of each state itself (recomputed here, one drive pass).
    """
    ins_a, ins_b = [x] + list(states_a[:-1]), [x_b] + list(states_b[:-1])
    for l, layer in enumerate(layers):
        idx_a = layer.drive(ins_a[l])[1]
        idx_b = layer.drive(ins_b[l])[1]
        layer.accumulate_contrastive_grad(ins_a[l], states_a[l], idx_a, ins_b[l], states_b[l], idx_b, scale)


def ep_backward(net, x, y, beta, T1, T2, nudging, tol=None, check_every=10, keep_states=False, teacher=None):
    """Free phase, nudged phase(s), EP gradient into ``.grad``. See DESIGN.md section 2."""
    layers, gain = net.layers, ACTIVATION_GAIN[net.activation]
    plan = net._plan(x)
    n = x.shape[0]
    teacher = resolve_teacher(net, teacher, x)
    grads_before = [[None if p.grad is None else p.grad.clone() for p in layer.parameters()] for layer in layers]
    with torch.no_grad():
        prepared = prepare_layers(layers, net.compute_dtype)
        first = layers[0].drive(x, prepared[0])
        s_free, free_rep = free_phase(layers, plan, x, T1, gain, tol, check_every, first_drive=first,
                                      prepared=prepared, schedule=net.schedule)
        s_star = [s.clone() for s in s_free]
        if nudging == "symmetric":
            # +beta and -beta are independent: one phase on a batch of 2N.
            x2 = torch.cat([x, x])
            first2 = (torch.cat([first[0], first[0]]),
                      torch.cat([first[1], first[1]]) if first[1] is not None else None)
            betas = torch.cat([torch.full((n,), beta, dtype=x.dtype, device=x.device),
                               torch.full((n,), -beta, dtype=x.dtype, device=x.device)])
            s2 = [torch.cat([s, s]) for s in s_star]
            s_nud, nud_rep = nudged_phase(net, plan, x2, torch.cat([y, y]), _double_teacher(teacher), s2, betas, T2,
                                          gain, tol, check_every, first_drive=first2, prepared=prepared,
                                          schedule=net.schedule)
            s_plus = [s[:n].clone() for s in s_nud]
            s_minus = [s[n:].clone() for s in s_nud]
            contrastive_update(layers, x, s_plus, s_minus, x, -1.0 / (2.0 * beta * n))
            head_states = (s_plus, s_minus)
        else:
            b = beta
            if nudging == "random-sign":
                b = beta if torch.randint(0, 2, (1,)).item() == 1 else -beta
            betas = torch.full((n,), b, dtype=x.dtype, device=x.device)
            s_nud, nud_rep = nudged_phase(net, plan, x, y, teacher, s_star, betas, T2, gain, tol, check_every,
                                          first_drive=first, prepared=prepared, schedule=net.schedule)
            s_plus, s_minus = [s.clone() for s in s_nud], None
            contrastive_update(layers, x, s_plus, s_star, x, -1.0 / (b * n))
            head_states = (s_star,)
        nudge_mag = [(sp - ss).abs().mean().item() for sp, ss in zip(s_plus, s_star)]
        grad_mag = []
        for layer, before in zip(layers, grads_before):
            ps = list(layer.parameters())
            grad_mag.append(sum((p.grad - (0 if b0 is None else b0)).abs().sum().item() for p, b0 in zip(ps, before))
                            / sum(p.numel() for p in ps))
        total, loss, logits, aux = total_cost(net, s_star, y, teacher)
    # Readout and signal heads: the ordinary gradient of their cost, averaged over the nudged
    # states (symmetric) or at the free state (one-sided: no two-sided average exists, and
    # s* gives the unbiased value). States are constants here; only head parameters learn.
    if net.readout is not None or len(net.signals):
        with torch.enable_grad():
            c = sum(total_cost(net, s, y, teacher)[0] for s in head_states) / len(head_states)
            if c.requires_grad:
                c.backward()
    diagnostics = {"free": free_rep.as_dict(), "nudged": nud_rep.as_dict(), "nudge_magnitude": nudge_mag,
                   "grad_magnitude": grad_mag, "beta": beta, "nudging": nudging,
                   "total_cost": float(total), "signal_losses": [float(a) for a in aux]}
    kept = {"free": s_star, "plus": s_plus, "minus": s_minus} if keep_states else None
    return EPResult(loss=loss.detach(), logits=logits.detach(), diagnostics=diagnostics, states=kept)


def bptt(net, x, y, T1, teacher=None):
    """Backpropagation through T1 free steps from zero states: the gradient EP estimates.

    Uses the same synapse methods under the differentiable reference ops, with a functional
    (not in-place) state update; memory grows with T1, which is why EP exists.
    """
    from ._backend import use_backend

    teacher = resolve_teacher(net, teacher, x)
    layers, gain = net.layers, ACTIVATION_GAIN[net.activation]
    plan = net._plan(x)
    L = len(layers)
    shapes = [tuple(x.shape[1:])] + list(plan.state_shapes[:-1])
    states = [torch.zeros((x.shape[0],) + s, dtype=x.dtype, device=x.device) for s in plan.state_shapes]
    with use_backend("reference"), torch.enable_grad():
        first = layers[0].drive(x)

        def updated(states, which):
            """New values of the states ``which``, all from ``states`` (each drive once)."""
            drives = {}

            def drive(l):
                if l not in drives:
                    drives[l] = first if l == 0 else layers[l].drive(states[l - 1])
                return drives[l]

            new = {}
            for l in which:
                total = drive(l)[0]
                if l + 1 < L:
                    idx = drive(l + 1)[1] if getattr(layers[l + 1], "pool", 1) > 1 else None
                    total = total + layers[l + 1].top_down(states[l + 1], idx, shapes[l + 1])
                new[l] = torch.clamp(gain * total, 0.0, 1.0)
            return [new.get(l, s) for l, s in enumerate(states)]

        # The schedules of ``STEPS``: synchronous, or odd-numbered states then even-numbered ones.
        halves = [range(L)] if net.schedule == "synchronous" else [range(0, L, 2), range(1, L, 2)]
        for _ in range(T1):
            for which in halves:
                states = updated(states, which)
        total, loss, logits, aux = total_cost(net, states, y, teacher)
        total.backward()
    return EPResult(loss=loss.detach(), logits=logits.detach(),
                    diagnostics={"T1": T1, "total_cost": float(total.detach()),
                                 "signal_losses": [float(a.detach()) for a in aux]})
