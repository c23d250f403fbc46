"""Do EP gradients of this library agree with backpropagation through time?

``gradcheck(net, x, y)``: for a network and a batch, per parameter tensor, the cosine
similarity and relative error of the fast path's EP gradient against BPTT computed by the
independent reference (``ep_reference``), the convergence residual of each phase, and the
number of units whose regime switches between the two nudged states (max-pool winners,
hard-sigmoid clamp boundaries): the places where EP's finite-beta estimate departs from the
derivative. The per-step "gradient-descending updates" curves (EP nudged-phase updates against
truncated BPTT, Ernoult et al. 2019) come from the reference. ``format_table`` shows reports
as text.

The ``ep-gradcheck`` command line (datasets, presets, checkpoints, the plot) is the
application's: ``ep_kernels.app.gradcheck``. This module needs only torch and ``ep_reference``.
"""
import copy

import torch

import ep_reference

from .network import EPNetwork


def _switches(net, x, s_a, s_b):
    """Per layer: (#max-pool winners that differ, #units that cross a clamp boundary)."""
    out = []
    ins_a, ins_b = [x] + s_a[:-1], [x] + s_b[:-1]
    with torch.no_grad():
        for l, layer in enumerate(net.layers):
            ia, ib = layer.drive(ins_a[l])[1], layer.drive(ins_b[l])[1]
            winners = 0 if ia is None else int((ia != ib).sum())
            lin_a = (s_a[l] > 0) & (s_a[l] < 1)
            lin_b = (s_b[l] > 0) & (s_b[l] < 1)
            out.append({"pool_switches": winners, "clamp_switches": int((lin_a != lin_b).sum())})
    return out


def converged_ep_gradient(net, x, y, beta, free_state=None, tol=1e-12, max_steps=5000, nudging="symmetric",
                          teacher=None):
    """EP* of a fixed point: the EP gradient at ``beta`` with every phase converged in float64.

    A network with max-pooling may have several fixed points, and a path (fixed steps, early
    stopping, float32, another schedule) settles in one of them. To judge that path's gradient,
    give its free state as ``free_state``: the free phase continues from it in float64 until
    every layer's change is below ``tol`` (it stays in that fixed point's basin), both nudged
    phases run from there to ``tol`` too, and the EP gradient of those states is returned.
    Without ``free_state`` the free phase starts from zeros.

    Returns ``(grads, info)``: the gradients by parameter name (float64) and the steps and
    residuals of each phase; raises ``RuntimeError`` if a phase does not converge within
    ``max_steps``. ``net`` is not modified.
    """
    if not isinstance(net, EPNetwork):
        raise TypeError(f"net must be an EPNetwork, got {type(net).__name__}")
    net64 = copy.deepcopy(net).double()
    net64.check_every = 1
    net64.compute_dtype = None
    x64 = x.double()
    init = None if free_state is None else [s.detach().double() for s in free_state]
    net64.zero_grad(set_to_none=True)
    res = net64.ep_backward(x64, y, beta=beta, T1=max_steps, T2=max_steps, nudging=nudging, tol=tol,
                            free_init=init, teacher=teacher)
    info = {phase: res.diagnostics[phase] for phase in ("free", "nudged")}
    for phase, rep in info.items():
        if not rep["converged"]:
            raise RuntimeError(f"converged_ep_gradient: the {phase} phase did not reach tol={tol:g} in {max_steps} "
                               f"steps (residual {max(rep['residual']):.3g}); raise max_steps")
    return {n: p.grad.detach().clone() for n, p in net64.named_parameters() if p.grad is not None}, info


def gradcheck(net, x, y, beta=1e-3, T1=300, T2=100, nudging="symmetric", dtype=torch.float64, gdu=True,
              teacher=None, compute_dtype=None):
    """Compare EP (fast path) with BPTT (independent reference) on one batch.

    The network is copied and cast to ``dtype``; it is not modified. Returns a dict that is
    JSON-serialisable (``format_table`` shows it).
    """
    if not isinstance(net, EPNetwork):
        raise TypeError(f"net must be an EPNetwork, got {type(net).__name__}")
    net = copy.deepcopy(net).to(dtype)
    net.compute_dtype = compute_dtype  # e.g. bfloat16 convolutions with `dtype` states
    x = x.to(dtype)
    if teacher is not None and not isinstance(teacher, dict):
        with torch.no_grad():
            teacher = getattr(teacher, "targets", teacher)(x)
    if teacher is not None:
        teacher = {k: ({i: t.to(dtype) for i, t in v.items()} if isinstance(v, dict) else v.to(dtype))
                   for k, v in teacher.items()}
    net.zero_grad(set_to_none=True)
    res = net.ep_backward(x, y, beta=beta, T1=T1, T2=T2, nudging=nudging, keep_states=True, teacher=teacher)
    g_ep = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    ref = ep_reference.ReferenceNet.from_module(net)
    bp = ep_reference.bptt_gradient(ref, x, y, T1, teacher=teacher)
    second = res.states["minus"] if res.states["minus"] is not None else res.states["free"]
    report = {
        "config": {"beta": beta, "T1": T1, "T2": T2, "nudging": nudging,
                   "dtype": str(dtype).replace("torch.", "") + ("" if compute_dtype is None else
                                                              "/" + str(compute_dtype).replace("torch.", "")),
                   "batch": int(x.shape[0]), "activation": net.activation, "mode": net.mode},
        "loss": float(res.loss),
        "total_cost": res.diagnostics["total_cost"],
        "residual": {"free": res.diagnostics["free"]["residual"], "nudged": res.diagnostics["nudged"]["residual"]},
        "switches": _switches(net, x, res.states["plus"], second),
        "params": {},
    }
    for name, (cos, rel) in ep_reference.cosine_and_relerr(g_ep, bp.grads).items():
        report["params"][name] = {"cosine": cos, "relerr": rel, "norm_ep": float(g_ep[name].norm()),
                                  "norm_bptt": float(bp.grads[name].norm())}
    if gdu:
        curves = ep_reference.gdu_curves(ref, x, y, beta, T1, T2, teacher=teacher)
        report["gdu"] = {}
        for name in curves.ep:
            e, b = curves.ep[name].flatten(1), curves.bptt[name].flatten(1)
            ec, bc = curves.ep_cum[name].flatten(1), curves.bptt_cum[name].flatten(1)
            # A few fixed components (the largest of the full BPTT gradient) as in Ernoult et al.
            comps = bc[-1].abs().topk(min(3, bc.shape[1])).indices
            # Signals travel one layer per step, so some steps of a layer carry no update at
            # all; a cosine is only meaningful on steps whose update is not negligible.
            nb = b.norm(dim=1)
            significant = nb > 1e-4 * nb.max()
            cos = torch.nn.functional.cosine_similarity(e, b, dim=1)
            report["gdu"][name] = {
                "step_cosine": [c if ok else None for c, ok in zip(cos.tolist(), significant.tolist())],
                "step_norm_ep": e.norm(dim=1).tolist(),
                "step_norm_bptt": b.norm(dim=1).tolist(),
                "components": comps.tolist(),
                "ep_cum": ec[:, comps].t().tolist(),
                "bptt_cum": bc[:, comps].t().tolist(),
            }
    return report


def format_table(reports):
    """The reports of ``gradcheck`` as a text table (one block per report)."""
    lines = []
    for r in reports:
        c = r["config"]
        lines.append(f"beta={c['beta']:g}  dtype={c['dtype']}  nudging={c['nudging']}  T1={c['T1']}  T2={c['T2']}  "
                     f"batch={c['batch']}  loss={r['loss']:.4f}")
        lines.append(f"  residual (max |s_t - s_t-1| at the end): free {max(r['residual']['free']):.2e}, "
                     f"nudged {max(r['residual']['nudged']):.2e}")
        sw = ", ".join(f"layer {i}: {s['pool_switches']} pool / {s['clamp_switches']} clamp"
                       for i, s in enumerate(r["switches"]))
        lines.append(f"  regime switches between the nudged states: {sw}")
        lines.append(f"  {'parameter':<22}{'cosine':>12}{'rel. error':>12}{'|g_EP|':>12}{'|g_BPTT|':>12}")
        for name, p in r["params"].items():
            flag = "" if p["cosine"] >= 0.9999 else "   <- below 0.9999"
            lines.append(f"  {name:<22}{p['cosine']:>12.6f}{p['relerr']:>12.2e}{p['norm_ep']:>12.3e}"
                         f"{p['norm_bptt']:>12.3e}{flag}")
        if "gdu" in r:
            worst = min(c for v in r["gdu"].values() for c in v["step_cosine"] if c is not None)
            lines.append(f"  per-step EP updates vs truncated BPTT (steps with non-negligible updates): "
                         f"worst cosine {worst:.6f}")
        lines.append("")
    return "\n".join(lines)
