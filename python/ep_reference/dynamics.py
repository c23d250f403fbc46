"""Phi, the cost, and relaxation by autograd of Phi (docs/design.md, "The energy and the dynamics").

As in the public code of Laborieux et al. 2021, the update is ``s_l <- sigma(dPhi_beta/ds_l)``
with the derivative taken by ``torch.autograd.grad``. That gives, with nothing written by
hand, the bottom-up drive ``a_l(s_{l-1})`` plus the top-down term: the transposed
convolution of ``s_{l+1}`` max-unpooled to the argmax positions of the current step (the
backward of ``F.max_pool2d`` routes to its argmax, first position on ties), and the nudge
``-beta dC/ds``. All layers update synchronously from the same old state, or (the
``alternating`` schedule) odd-numbered layers first, then even-numbered ones.

The cost is ``C = L_out + sum_l lambda_l L_l(s_l)`` (docs/design.md, "How signals enter the cost and the nudges"): the intermediate
error signals of ``ref.signals`` are part of it, so ``Phi_beta = Phi - beta C`` and the same
autograd step gives each supervised layer its extra nudge ``-beta lambda_l dL_l/ds_l``.
Distillation targets come as ``teacher = {"features": {layer: tensor}, "logits": tensor}``.
"""
import torch
import torch.nn.functional as F


def sigma(ref, h):
    """Hard sigmoid ``clamp(gain * h, 0, 1)``; gain 1 or 1/2 (``ref.activation``)."""
    return torch.clamp(ref.gain * h, 0.0, 1.0)


def synapse(ref, i, s_prev, params=None):
    """``a_i(s_{i-1})``: pooled conv drive or linear drive of layer ``i`` (0-based)."""
    params = ref.params if params is None else params
    L = ref.layers[i]
    w, b = params[L.weight], (params[L.bias] if L.bias else None)
    if L.kind == "conv":
        h = F.conv2d(s_prev, w, b, L.stride, L.padding, L.dilation, L.groups)
        return F.max_pool2d(h, L.pool, L.pool) if L.pool > 1 else h
    return F.linear(s_prev.flatten(1), w, b)


def phi(ref, x, states, params=None):
    """Per-example primitive ``Phi = sum_l <s_l, a_l(s_{l-1})>``, shape (N,)."""
    lower = [x] + list(states[:-1])
    return sum((s * synapse(ref, i, sp, params)).flatten(1).sum(1)
               for i, (sp, s) in enumerate(zip(lower, states)))


def logits(ref, states, params=None):
    """Readout ``R flat(s_L) + c`` (CE mode only)."""
    params = ref.params if params is None else params
    return F.linear(states[-1].flatten(1), params["readout.weight"], params.get("readout.bias"))


def output_cost(ref, states, y, params=None):
    """Per-example output cost, shape (N,): CE of the readout, or 1/2 ||s_L - onehot(y)||^2."""
    if ref.mode == "ce":
        return F.cross_entropy(logits(ref, states, params), y, reduction="none")
    out = states[-1].flatten(1)
    return 0.5 * ((out - F.one_hot(y, out.shape[1]).to(out.dtype)) ** 2).sum(1)


def resolve_teacher(ref, teacher, x=None):
    """Check the teacher targets the signals need; a callable is called once on ``x``.

    Returns the dict (or None). Raises ValueError when a distillation signal has no target.
    """
    if teacher is not None and callable(teacher) and not isinstance(teacher, dict):
        with torch.no_grad():
            teacher = teacher(x)
    if teacher is not None and not isinstance(teacher, dict):
        raise TypeError("teacher must be a dict {'features': {layer: tensor}, 'logits': tensor}")
    for sig in ref.signals:
        if sig.kind == "feature":
            _features(teacher, sig)
        elif sig.kind == "logit":
            _teacher_logits(teacher, sig)
    return teacher


def _features(teacher, sig):
    if teacher is None:
        raise ValueError(f"feature distillation at layer {sig.layer} needs teacher targets (teacher=None)")
    feats = teacher.get("features") or {}
    for key in (sig.layer, sig.index):
        if key in feats:
            return feats[key]
    raise ValueError(f"the teacher has no features for layer {sig.layer} (has {sorted(feats, key=str)})")


def _teacher_logits(teacher, sig):
    if teacher is None or teacher.get("logits") is None:
        raise ValueError(f"logit distillation at {sig.layer!r} needs teacher logits (teacher['logits'])")
    return teacher["logits"]


def _linear_head(params, names, s, pool_size):
    """A linear head on the state, average-pooled to pool_size x pool_size when 4-D."""
    if s.dim() == 4:
        s = F.adaptive_avg_pool2d(s, pool_size)
    return F.linear(s.flatten(1), params[names[0]], params[names[1]] if names[1] else None)


def signal_loss(ref, sig, states, y, params=None, teacher=None):
    """Per-example loss ``L_l`` of one signal (unweighted), shape (N,)."""
    params = ref.params if params is None else params
    s = states[sig.index]
    if sig.kind == "classifier":
        return F.cross_entropy(_linear_head(params, sig.head, s, sig.pool_size), y, reduction="none")
    if sig.kind == "feature":
        w, b = params[sig.map[0]], (params[sig.map[1]] if sig.map[1] else None)
        m = F.conv2d(s, w, b) if w.dim() == 4 else F.linear(s.flatten(1), w, b)
        t = _features(teacher, sig)
        if m.shape != t.shape:
            raise ValueError(f"feature distillation at layer {sig.layer}: mapped state {tuple(m.shape)} "
                             f"!= teacher features {tuple(t.shape)}")
        return 0.5 * ((m - t) ** 2).flatten(1).sum(1)
    # logit distillation: tau^2 KL(softmax(t/tau) || softmax(h/tau)), written as kl_div
    h = logits(ref, states, params) if sig.layer == "readout" else _linear_head(params, sig.head, s, sig.pool_size)
    t = _teacher_logits(teacher, sig)
    log_q = F.log_softmax(h / sig.tau, dim=1)
    log_p = F.log_softmax(t / sig.tau, dim=1)
    return sig.tau ** 2 * F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1)


def cost(ref, states, y, params=None, teacher=None):
    """Per-example cost ``C = L_out + sum_l lambda_l L_l(s_l)``, shape (N,)."""
    c = output_cost(ref, states, y, params)
    for sig in ref.signals:
        c = c + sig.weight * signal_loss(ref, sig, states, y, params, teacher)
    return c


def init_states(ref, x):
    """Zero states with the shapes the synapses produce from ``x``."""
    with torch.no_grad():
        h, states = x, []
        for i in range(len(ref.layers)):
            h = synapse(ref, i, h)
            states.append(torch.zeros_like(h))
    return states


def _grad_phi(ref, x, states, y, beta, params, create_graph, teacher):
    """``dPhi_beta/ds_l`` for every l, at ``states``."""
    with torch.enable_grad():
        if create_graph:
            # A fresh alias per state, so the gradient is the partial derivative: with the
            # alternating schedule some states are functions of others in the same list.
            states = [s.view_as(s) if s.requires_grad else s.detach().requires_grad_() for s in states]
        else:
            states = [s.detach().requires_grad_() for s in states]
        f = phi(ref, x, states, params).sum()
        if beta != 0:
            f = f - beta * cost(ref, states, y, params, teacher).sum()
        return torch.autograd.grad(f, states, create_graph=create_graph)


def step(ref, x, states, y=None, beta=0.0, params=None, create_graph=False, teacher=None):
    """One step ``s_l <- sigma(dPhi_beta/ds_l)`` for every l.

    ``ref.schedule == "synchronous"``: every layer from the same old states. ``"alternating"``:
    the layers with even 0-based index (``s_1, s_3, ...``) from the old states, then the
    others from the states with the first half already updated (the gradient is simply
    taken again; the fast path's bookkeeping of which drives it can reuse is not copied).

    ``create_graph=True`` keeps the step differentiable w.r.t. ``params`` and the incoming
    states (BPTT); otherwise the new states are detached.
    """
    halves = [range(len(states))]
    if ref.schedule == "alternating":
        halves = [range(0, len(states), 2), range(1, len(states), 2)]
    new = list(states)
    for which in halves:
        grads = _grad_phi(ref, x, new, y, beta, params, create_graph, teacher)
        for l in which:
            new[l] = sigma(ref, grads[l])
    return new if create_graph else [s.detach() for s in new]


def relax(ref, x, y, beta, T, states=None, return_trajectory=False, teacher=None):
    """``T`` steps at ``beta`` from ``states`` (zeros if None).

    Returns the final states, or ``(states, trajectory)`` with ``trajectory[t]`` the states
    after ``t`` steps (``trajectory[0]`` the start).
    """
    states = init_states(ref, x) if states is None else [s.detach() for s in states]
    traj = [states]
    for _ in range(T):
        states = step(ref, x, states, y, beta, teacher=teacher)
        if return_trajectory:
            traj.append(states)
    return (states, traj) if return_trajectory else states


def free_phase(ref, x, T1):
    """``T1`` steps at beta = 0 from zero states: ``s*``."""
    return relax(ref, x, None, 0.0, T1)


def nudged_phase(ref, x, y, states, beta, T2, teacher=None):
    """``T2`` steps at ``beta`` from ``states`` (usually ``s*``): ``s+`` or ``s-``."""
    return relax(ref, x, y, beta, T2, states=states, teacher=teacher)


def residual(ref, x, states, y=None, beta=0.0, teacher=None):
    """``max |step(s) - s|``: how far ``states`` are from a fixed point."""
    nxt = step(ref, x, states, y, beta, teacher=teacher)
    return max(float((a - b).abs().max()) for a, b in zip(nxt, states))
