"""``ep-gradcheck``: do EP gradients of this library agree with backpropagation through time?

The command line of ``ep_kernels.gradcheck.gradcheck`` (see there for what is compared): a
preset network (or the weights of an ``ep-train`` run, ``--checkpoint RUN_DIR``) and a batch
of a dataset, one check per beta and dtype. Output: a table on the terminal
(``ep_kernels.gradcheck.format_table``), ``report.json`` and the plot ``gradcheck.png``.

    ep-gradcheck --preset small --betas 1e-3,1e-2
    ep-gradcheck --checkpoint runs/<name> --T1 300 --T2 100
    python -m ep_kernels.app.gradcheck --help
"""
import argparse
import json
import math
import os
import sys

import torch

from ..gradcheck import format_table, gradcheck
from ..models import build_network
from ..relaxation import SCHEDULES
from .checkpoint import load_checkpoint
from .config import UsageError, attach_signals
from .data import load_dataset


def plot(reports, path):
    """``gradcheck.png``: 1 - cosine per parameter for every report, and the first report's
    per-step (gradient-descending updates) curves."""
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
    """Entry point of ``ep-gradcheck``; returns the reports."""
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
        net = load_network(a.checkpoint, data)
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


def load_network(path, data):
    """The network of an ``ep-train`` run (its folder or ``checkpoint.pt``) for ``data``, with
    the trained weights and the run's local classifiers (part of the cost it trained)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    ckpt = load_checkpoint(path)
    cfg = ckpt.get("config") or {}
    if isinstance(cfg, str):
        cfg = json.loads(cfg)
    net = build_network(cfg.get("preset", "small"), data.in_shape, data.n_classes,
                        activation=cfg.get("activation", "hardsigmoid_half"), width=cfg.get("width"),
                        schedule=cfg.get("schedule") or cfg.get("schedule_used"))
    if any(k.startswith("signals.") for k in ckpt["model"]):
        # The run's intermediate signals are part of the cost it trained: check EP of that cost.
        try:
            attach_signals(dict(cfg), net)
        except UsageError as e:
            raise ValueError(f"{path}: cannot rebuild the run's signals: {e}") from None
        if any(sig.kind in ("feature", "logit") for sig in net.signals):
            raise ValueError(f"{path}: the run trained with distillation signals, which need its teacher; "
                             "ep-gradcheck --checkpoint supports runs with local classifiers only")
    net.load_state_dict(ckpt["model"])
    return net


if __name__ == "__main__":
    main()
