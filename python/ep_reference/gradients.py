"""EP gradient, BPTT gradient, and the step-by-step GDU comparison (docs/design.md, "The EP gradient").

Every parameter gradient here is an autograd gradient of a scalar written in plain torch:
dPhi/dtheta at fixed states for EP, the loss after ``T1`` differentiable steps for BPTT.
So the reference needs no hand-written weight-gradient, unpool or transposed convolution.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .dynamics import (cost, free_phase, init_states, logits, nudged_phase, output_cost, phi, relax,
                       resolve_teacher, signal_loss, step)


def phi_param_grads(ref, x, states):
    """``dPhi/dtheta`` (Phi summed over the batch) at fixed ``states``, per layer parameter.

    The argmax positions are those of ``states``: exactly the "conv weight-gradient with
    output-gradient U_l(s_l)" of the design, obtained by autograd through ``max_pool2d``.
    """
    names = ref.layer_param_names
    params = dict(ref.params)
    for n in names:
        params[n] = params[n].detach().requires_grad_()
    with torch.enable_grad():
        f = phi(ref, x, [s.detach() for s in states], params).sum()
        g = torch.autograd.grad(f, [params[n] for n in names])
    return dict(zip(names, g))


def head_grads(ref, states, y, teacher=None):
    """Ordinary gradient of the batch-mean cost ``C`` (output loss + ``lambda_l L_l``) w.r.t.
    everything outside Phi (readout, signal heads and maps), at fixed ``states``."""
    names = ref.head_param_names
    if not names:
        return {}
    params = dict(ref.params)
    for n in names:
        params[n] = params[n].detach().requires_grad_()
    with torch.enable_grad():
        loss = cost(ref, [s.detach() for s in states], y, params, teacher).mean()
        g = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(params[n]) if gi is None else gi for n, gi in zip(names, g)}


def readout_grads(ref, states, y, teacher=None):
    """:func:`head_grads` restricted to the readout (kept for older callers)."""
    g = head_grads(ref, states, y, teacher)
    return {n: g[n] for n in ref.readout_param_names}


@dataclass
class EPResult:
    grads: Dict[str, torch.Tensor]
    loss: torch.Tensor  # batch-mean C(s*), the total cost (output + weighted signals)
    logits: Optional[torch.Tensor]  # readout at s* (CE mode), else None
    s_free: List[torch.Tensor]
    s_pos: List[torch.Tensor]
    s_neg: Optional[List[torch.Tensor]]  # None for one-sided
    output_loss: Optional[torch.Tensor] = None  # batch-mean L_out(s*)
    signal_losses: Optional[List[torch.Tensor]] = None  # batch-mean L_l(s*) per signal, unweighted


def _losses(ref, states, y, teacher):
    with torch.no_grad():
        return (output_cost(ref, states, y).mean(),
                [signal_loss(ref, sig, states, y, teacher=teacher).mean() for sig in ref.signals])


def ep_gradient(ref, x, y, beta, T1, T2, nudging="symmetric", teacher=None):
    """EP estimate of ``d mean_n C(s*) / dtheta`` for every parameter (readout, heads and
    maps included); ``C`` includes the intermediate signals, ``teacher`` their targets.

    symmetric: ``-(1/(2 beta)) (dPhi/dtheta(s+) - dPhi/dtheta(s-)) / N`` (bias O(beta^2));
    one-sided: ``-(1/beta) (dPhi/dtheta(s+) - dPhi/dtheta(s*)) / N`` (bias O(beta)).
    Readout, heads, maps: ordinary gradient of the mean cost averaged over s+ and s-
    (symmetric) or at s* (one-sided).
    """
    if beta == 0:
        raise ValueError("beta must be non-zero")
    teacher = resolve_teacher(ref, teacher, x)
    n = x.shape[0]
    s_free = free_phase(ref, x, T1)
    s_pos = nudged_phase(ref, x, y, s_free, beta, T2, teacher=teacher)
    if nudging == "symmetric":
        s_neg = nudged_phase(ref, x, y, s_free, -beta, T2, teacher=teacher)
        low, scale, ro_states = s_neg, 1.0 / (2.0 * beta), [s_pos, s_neg]
    elif nudging == "one-sided":
        s_neg = None
        low, scale, ro_states = s_free, 1.0 / beta, [s_free]
    else:
        raise ValueError(f"nudging must be 'symmetric' or 'one-sided', got {nudging!r}")
    gp, gl = phi_param_grads(ref, x, s_pos), phi_param_grads(ref, x, low)
    grads = {k: -scale * (gp[k] - gl[k]) / n for k in gp}
    if ref.head_param_names:
        ros = [head_grads(ref, s, y, teacher) for s in ro_states]
        grads.update({k: sum(r[k] for r in ros) / len(ros) for k in ros[0]})
    grads = {k: grads[k] for k in ref.params}  # parameter order
    out, sig = _losses(ref, s_free, y, teacher)
    return EPResult(grads, cost(ref, s_free, y, teacher=teacher).mean(),
                    logits(ref, s_free) if ref.mode == "ce" else None, s_free, s_pos, s_neg, out, sig)


@dataclass
class BPTTResult:
    grads: Dict[str, torch.Tensor]
    loss: torch.Tensor  # batch-mean C(s(T1)) (total cost), detached
    states: List[torch.Tensor]  # s(T1), detached
    output_loss: Optional[torch.Tensor] = None
    signal_losses: Optional[List[torch.Tensor]] = None


def _leaf_params(ref, names):
    p = dict(ref.params)
    for n in names:
        p[n] = p[n].detach().clone().requires_grad_()
    return p


def bptt_gradient(ref, x, y, T1, teacher=None):
    """Gradient of ``mean_n C(s(T1))`` by backpropagation through ``T1`` free steps from zero;
    ``C`` includes the intermediate signals (``teacher``: their distillation targets).

    Each step is ``sigma(dPhi/ds)`` taken with ``create_graph=True``, so the backward pass
    differentiates through the autograd step itself (double backward), argmax positions
    being those of each step.
    """
    teacher = resolve_teacher(ref, teacher, x)
    names = list(ref.params)
    params = _leaf_params(ref, names)
    with torch.enable_grad():
        states = init_states(ref, x)
        for _ in range(T1):
            states = step(ref, x, states, params=params, create_graph=True)
        loss = cost(ref, states, y, params, teacher).mean()
        g = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    grads = {n: torch.zeros_like(params[n]) if gi is None else gi for n, gi in zip(names, g)}
    states = [s.detach() for s in states]
    out, sig = _losses(ref, states, y, teacher)
    return BPTTResult(grads, loss.detach(), states, out, sig)


@dataclass
class GDUCurves:
    """Per layer parameter, tensors of shape (T2, *param.shape), indexed by t = 0..T2-1."""

    ep: Dict[str, torch.Tensor]  # EP update of nudged step t
    bptt: Dict[str, torch.Tensor]  # BPTT contribution of the t-th-from-last free step
    ep_cum: Dict[str, torch.Tensor]
    bptt_cum: Dict[str, torch.Tensor]


def gdu_curves(ref, x, y, beta, T1, T2, teacher=None):
    """The "gradient-descending updates" comparison of Ernoult et al. 2019 (layer params).

    (a) EP, one-sided +beta from s* = s(T1): ``-(1/beta)(dPhi/dtheta(s_{t+1}) -
        dPhi/dtheta(s_t)) / N``; its cumulative sum is the one-sided EP estimate after t+1 steps.
    (b) BPTT: the gradient of ``mean_n C(s(T1))`` w.r.t. the parameters used in step
        ``T1-1-t`` only: the free phase runs to ``T1-T2`` without graph, then each of the last
        ``T2`` steps gets its own leaf copy of the parameters, and one backward reads them all.
    The readout, heads and maps take no part in the steps, so they have no curve; the cost
    (and so the nudge) includes the intermediate signals (``teacher``: their targets).
    """
    if not 0 < T2 <= T1:
        raise ValueError("need 0 < T2 <= T1")
    teacher = resolve_teacher(ref, teacher, x)
    n, names = x.shape[0], ref.layer_param_names
    s_free = free_phase(ref, x, T1)
    _, traj = relax(ref, x, y, beta, T2, states=s_free, return_trajectory=True, teacher=teacher)
    dphi = [phi_param_grads(ref, x, s) for s in traj]
    ep = {k: torch.stack([-(dphi[t + 1][k] - dphi[t][k]) / (beta * n) for t in range(T2)])
          for k in names}

    states = free_phase(ref, x, T1 - T2)
    copies = []
    with torch.enable_grad():
        for _ in range(T2):
            copies.append(_leaf_params(ref, names))
            states = step(ref, x, states, params=copies[-1], create_graph=True)
        loss = cost(ref, states, y, teacher=teacher).mean()
        leaves = [c[k] for c in reversed(copies) for k in names]  # t = 0 is the last step
        g = torch.autograd.grad(loss, leaves, allow_unused=True)
    g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, leaves)]
    bptt = {k: torch.stack(g[j::len(names)]) for j, k in enumerate(names)}
    return GDUCurves(ep, bptt, {k: v.cumsum(0) for k, v in ep.items()},
                     {k: v.cumsum(0) for k, v in bptt.items()})


def cosine_and_relerr(a, b):
    """``(cosine(a, b), ||a - b|| / ||b||)``, ``b`` the reference; dicts give a dict per key
    of ``b``. Two zero tensors count as equal (1.0, 0.0)."""
    if isinstance(b, dict):
        return {k: cosine_and_relerr(a[k], b[k]) for k in b}
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 and nb == 0.0:
        return 1.0, 0.0
    cos = float(a @ b) / max(na * nb, 1e-300)
    return cos, float((a - b).norm()) / max(nb, 1e-300)
