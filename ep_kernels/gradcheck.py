"""``ep-gradcheck``: do EP gradients of this library agree with backpropagation through time?

For a network and a batch, per parameter tensor: cosine similarity and relative error of
the fast path's EP gradient against BPTT computed by the independent reference
(``ep_reference``), the convergence residual of each phase, and the number of units whose
regime switches between the two nudged states (max-pool winners, hard-sigmoid clamp
boundaries): the places where EP's finite-beta estimate departs from the derivative. The
per-step "gradient-descending updates" curves (EP nudged-phase updates against truncated
BPTT, Ernoult et al. 2019) come from the reference. Output: a table on the terminal, a JSON
file and a PNG plot.
"""
import argparse
import copy
import json
import math
import os
import sys

import torch

import ep_reference

from .relaxation import SCHEDULES
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


def gradcheck(net, x, y, beta=1e-3, T1=300, T2=100, nudging="symmetric", dtype=torch.float64, gdu=True,
              teacher=None, compute_dtype=None):
    """Compare EP (fast path) with BPTT (independent reference) on one batch.

    The network is copied and cast to ``dtype``; it is not modified. Returns a dict that is
    JSON-serialisable (see ``main`` for how it is shown).
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


def plot(reports, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = reports[0]
    gdu_names = list(first.get("gdu", {}))
    ncols = 2 + min(len(gdu_names), 2)
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4))
    ax = axes[0]
    for r in reports:
        names = list(r["params"])
        err = [max(1.0 - r["params"][n]["cosine"], 1e-16) for n in names]
        ax.plot(range(len(names)), err, "o-", label=f"beta={r['config']['beta']:g} {r['config']['dtype']}")
    ax.axhline(1e-4, color="k", ls="--", lw=0.8, label="1 - 0.9999")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("1 - cosine(EP, BPTT)")
    ax.set_title("EP vs BPTT per parameter")
    ax.legend(fontsize=7)
    ax = axes[1]
    for name in gdu_names:
        c = first["gdu"][name]["step_cosine"]
        ax.plot([t for t in range(len(c)) if c[t] is not None], [v for v in c if v is not None], ".-", label=name)
    ax.set_xlabel("step t of the nudged phase / t-th last free step")
    ax.set_ylabel("cosine(dEP_t, dBPTT_t)")
    ax.set_title(f"gradient-descending updates (beta={first['config']['beta']:g})")
    if gdu_names:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not computed (--no-gdu)", ha="center", transform=ax.transAxes)
    for k, name in enumerate(gdu_names[:2]):
        ax = axes[2 + k]
        g = first["gdu"][name]
        for j, (e, b) in enumerate(zip(g["ep_cum"], g["bptt_cum"])):
            ax.plot(e, color=f"C{j}", label="EP" if j == 0 else None)
            ax.plot(b, color=f"C{j}", ls="--", label="BPTT" if j == 0 else None)
        ax.set_title(f"{name}: cumulative updates, 3 components", fontsize=9)
        ax.set_xlim(0, min(len(g["ep_cum"][0]), 20))
        ax.set_xlabel("t")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_floats(text, name):
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"ep-gradcheck: {name} must be comma-separated numbers, got {text!r}")
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise SystemExit(f"ep-gradcheck: {name} must be positive numbers, got {text!r}")
    return vals


def main(argv=None):
    from .data import load_dataset
    from .models import build_network

    p = argparse.ArgumentParser(prog="ep-gradcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="network preset (see ep-train --help)")
    p.add_argument("--width", type=float, default=0.25, help="channel multiplier of the preset")
    p.add_argument("--activation", default="hardsigmoid_half", choices=["hardsigmoid", "hardsigmoid_half"])
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="relaxation schedule (default: the preset's, or the checkpoint's)")
    p.add_argument("--checkpoint", help="an ep-train run folder or checkpoint.pt: check the trained weights")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--betas", default="1e-3,1e-2", help="comma-separated; one check per beta")
    p.add_argument("--dtypes", default="float64,float32", help="comma-separated: float64, float32")
    p.add_argument("--T1", type=int, default=300)
    p.add_argument("--T2", type=int, default=100)
    p.add_argument("--nudging", default="symmetric", choices=["symmetric", "one-sided"])
    p.add_argument("--compute-dtype", default=None, choices=["bfloat16", "float16"],
                   help="relax with convolutions in this dtype (states stay in --dtypes); BPTT stays exact")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gdu", action="store_true", help="skip the per-step curves (faster)")
    p.add_argument("--out", default="gradcheck", help="folder for report.json and gradcheck.png")
    a = p.parse_args(argv)
    betas = _parse_floats(a.betas, "--betas")
    dtypes = []
    for d in a.dtypes.split(","):
        if d.strip() not in ("float64", "float32"):
            p.error(f"--dtypes: unknown dtype {d!r}")
        dtypes.append(getattr(torch, d.strip()))
    if a.batch < 1 or a.T1 < 1 or a.T2 < 1 or a.T2 > a.T1:
        p.error("need --batch >= 1 and 1 <= --T2 <= --T1")

    torch.manual_seed(a.seed)
    data = load_dataset(a.dataset, a.data_dir)
    g = torch.Generator().manual_seed(a.seed)
    idx = torch.randperm(len(data.y_train), generator=g)[: a.batch]
    x, y = data.x_train[idx], data.y_train[idx]
    if a.checkpoint:
        net = _load_checkpoint(a.checkpoint, data)
        if a.schedule is not None:
            net.schedule = a.schedule
    else:
        net = build_network(a.preset, data.in_shape, data.n_classes, activation=a.activation, width=a.width,
                            schedule=a.schedule)
    a.schedule = net.schedule  # recorded in report.json

    reports = []
    for dt in dtypes:
        for beta in betas:
            print(f"ep-gradcheck: beta={beta:g} dtype={str(dt).replace('torch.', '')} ...", file=sys.stderr, flush=True)
            reports.append(gradcheck(net, x, y, beta, a.T1, a.T2, a.nudging, dt, gdu=not a.no_gdu,
                                     compute_dtype=getattr(torch, a.compute_dtype) if a.compute_dtype else None))
    print(format_table(reports))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump({"args": vars(a), "reports": reports}, f, indent=1)
    plot(reports, os.path.join(a.out, "gradcheck.png"))
    print(f"wrote {os.path.join(a.out, 'report.json')} and {os.path.join(a.out, 'gradcheck.png')}")
    return reports


def _load_checkpoint(path, data):
    from .models import build_network

    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ckpt.get("config") or {}
    if isinstance(cfg, str):
        cfg = json.loads(cfg)
    net = build_network(cfg.get("preset", "small"), data.in_shape, data.n_classes,
                        activation=cfg.get("activation", "hardsigmoid_half"), width=cfg.get("width"),
                        schedule=cfg.get("schedule") or cfg.get("schedule_used"))
    if any(k.startswith("signals.") for k in ckpt["model"]):
        # The run's intermediate signals are part of the cost it trained: check EP of that cost.
        from .train import UsageError, _attach_signals

        try:
            _attach_signals(dict(cfg), net)
        except UsageError as e:
            raise ValueError(f"{path}: cannot rebuild the run's signals: {e}") from None
        if any(sig.kind in ("feature", "logit") for sig in net.signals):
            raise ValueError(f"{path}: the run trained with distillation signals, which need its teacher; "
                             "ep-gradcheck --checkpoint supports runs with local classifiers only")
    net.load_state_dict(ckpt["model"])
    return net


if __name__ == "__main__":
    main()
