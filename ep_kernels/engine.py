"""The EP algorithm, in one place: the free and nudged phases, the EP gradient, and BPTT.

See docs/design.md, "The EP gradient". The relaxation steps, plans and nudges are in
``ep_kernels.relaxation`` (shared with the CUDA-graph runner, ``ep_kernels.cuda_graphs``).
Everything here except :func:`bptt` runs under ``torch.no_grad`` and through
``ep_kernels.ops``, so the backend (reference or compiled) is chosen by ``_backend``.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cuda_graphs
from ._backend import use_backend
from .relaxation import ACTIVATION_GAIN, PhaseReport, make_nudge_fn, prepare_layers, relax, start_states


@dataclass
class EPResult:
    loss: torch.Tensor
    logits: torch.Tensor
    diagnostics: dict = field(default_factory=dict)
    states: dict = None  # {"free", "plus", "minus"} lists of states, when asked for


def free_phase(layers, plan, x, T, gain, tol=None, check_every=10, first_drive=None, prepared=None,
               schedule="synchronous", init=None):
    """T steps at beta = 0 from zero states (or from ``init``, a list of states). Returns
    (s*, report); s* lives in the plan's buffers, so copy it before the next phase of the same
    batch size if you keep it."""
    if cuda_graphs.active_for(x):  # CUDA tensors: the same steps, as captured CUDA graphs
        return cuda_graphs.free_phase(layers, plan, x, T, gain, tol, check_every, first_drive, prepared,
                                      schedule=schedule, init=init)
    bufs, spare = plan.buffers(x.shape[0])
    start_states(bufs, init)
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


# With a low-precision compute dtype (bfloat16 convolutions), a phase stopping at ``tol`` runs in
# two stages: in that dtype down to this change (about where bfloat16 drives stop improving
# the states: measured near 5e-4), then in the parameters' dtype down to ``tol``. The fixed
# point reached is then the parameters' dtype's, at the cost of a few full-precision steps.
LOW_PRECISION_TOL = 1e-3


class Precision:
    """The stages of every phase of one call, each as (prepared weights, first-layer drive,
    tol): one stage in the parameters' dtype; with a lower compute dtype, one in it and, when
    the phases stop at ``tol``, a final one in the parameters' dtype. Only the weights and
    drives some stage uses are prepared."""

    def __init__(self, layers, x, compute_dtype, tol):
        lower = compute_dtype is not None and compute_dtype != layers[0].weight.dtype
        dtypes = [(None, tol)] if not lower else \
            [(compute_dtype, None)] if tol is None else \
            [(compute_dtype, max(tol, LOW_PRECISION_TOL)), (None, tol)]  # tol None: fixed steps, all low
        self.stages = []
        for dtype, stage_tol in dtypes:
            prepared = prepare_layers(layers, dtype)
            self.stages.append((prepared, layers[0].drive(x, prepared[0]), stage_tol))


def doubled(first):
    """A first-layer drive for the nudged phases' batch of 2N."""
    return torch.cat([first[0], first[0]]), torch.cat([first[1], first[1]]) if first[1] is not None else None


def in_stages(run, stages, T, start):
    """Run a phase stage by stage, each from the last one's states, ``T`` steps in all; a stage
    that does not converge (out of steps) ends the phase. ``run(prepared, first_drive, tol,
    steps, init)`` runs one stage. Returns (states, report)."""
    states, done, report = start, 0, None
    for prepared, first, tol in stages:
        if report is not None and (not report.converged or done >= T):
            break
        states, rep = run(prepared, first, tol, T - done, states)
        done += rep.steps
        report = PhaseReport(steps=done, residual=rep.residual, converged=rep.converged)
    return states, report


def relax_free(net, plan, x, T, check_every, precision, init=None):
    """The free phase of ``net`` (in stages, see ``Precision``); returns (s*, report)."""
    gain = ACTIVATION_GAIN[net.activation]

    def run(prepared, first, tol_, steps, start):
        return free_phase(net.layers, plan, x, steps, gain, tol_, check_every, first_drive=first, prepared=prepared,
                          schedule=net.schedule, init=start)
    return in_stages(run, precision.stages, T, init)


def relax_nudged(net, plan, x, y, teacher, s_start, betas, T, check_every, precision, doubled_batch):
    """The nudged phase(s) of ``net`` from ``s_start`` (in stages); returns (states, report)."""
    gain = ACTIVATION_GAIN[net.activation]

    def run(prepared, first, tol_, steps, start):
        first = doubled(first) if doubled_batch else first
        return nudged_phase(net, plan, x, y, teacher, start, betas, steps, gain, tol_, check_every, first_drive=first,
                            prepared=prepared, schedule=net.schedule)
    return in_stages(run, precision.stages, T, s_start)


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


def _grad_change(layer, before):
    """Mean |change of .grad| over a layer's trainable parameters during this call (0 if frozen)."""
    changes = [(p.grad - (0 if b0 is None else b0)).abs().sum().item()
               for p, b0 in zip(layer.parameters(), before) if p.grad is not None and p.requires_grad]
    n = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    return sum(changes) / n if n else 0.0


def ep_backward(net, x, y, beta, T1, T2, nudging, tol=None, check_every=10, keep_states=False, teacher=None,
                free_init=None):
    """Free phase, nudged phase(s), EP gradient into ``.grad``. See docs/design.md, "The EP gradient"."""
    layers = net.layers
    plan = net.plan_for(x)
    n = x.shape[0]
    teacher = resolve_teacher(net, teacher, x)
    grads_before = [[None if p.grad is None else p.grad.clone() for p in layer.parameters()] for layer in layers]
    with torch.no_grad():
        precision = Precision(layers, x, net.compute_dtype, tol)
        s_free, free_rep = relax_free(net, plan, x, T1, check_every, precision, init=free_init)
        s_star = [s.clone() for s in s_free]
        if nudging == "symmetric":
            # +beta and -beta are independent: one phase on a batch of 2N.
            betas = torch.cat([torch.full((n,), beta, dtype=x.dtype, device=x.device),
                               torch.full((n,), -beta, dtype=x.dtype, device=x.device)])
            s_nud, nud_rep = relax_nudged(net, plan, torch.cat([x, x]), torch.cat([y, y]), _double_teacher(teacher),
                                          [torch.cat([s, s]) for s in s_star], betas, T2, check_every, precision,
                                          doubled_batch=True)
            s_plus = [s[:n].clone() for s in s_nud]
            s_minus = [s[n:].clone() for s in s_nud]
            contrastive_update(layers, x, s_plus, s_minus, x, -1.0 / (2.0 * beta * n))
            head_states = (s_plus, s_minus)
        else:
            b = beta
            if nudging == "random-sign":
                b = beta if torch.randint(0, 2, (1,)).item() == 1 else -beta
            betas = torch.full((n,), b, dtype=x.dtype, device=x.device)
            s_nud, nud_rep = relax_nudged(net, plan, x, y, teacher, s_star, betas, T2, check_every, precision,
                                          doubled_batch=False)
            s_plus, s_minus = [s.clone() for s in s_nud], None
            contrastive_update(layers, x, s_plus, s_star, x, -1.0 / (b * n))
            head_states = (s_star,)
        nudge_mag = [(sp - ss).abs().mean().item() for sp, ss in zip(s_plus, s_star)]
        grad_mag = [_grad_change(layer, before) for layer, before in zip(layers, grads_before)]
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
    teacher = resolve_teacher(net, teacher, x)
    layers, gain = net.layers, ACTIVATION_GAIN[net.activation]
    plan = net.plan_for(x)
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
