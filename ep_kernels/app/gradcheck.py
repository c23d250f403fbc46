"""``ep-gradcheck``: do EP gradients of this library agree with backpropagation through time?

The command line of ``ep_kernels.gradcheck.gradcheck`` (see there for what is compared): a
preset network (or the weights of an ``ep-train`` run, ``--checkpoint RUN_DIR``) and a batch
of a dataset, one check per beta and dtype. Output: a table on the terminal
(``ep_kernels.gradcheck.format_table``), ``report.json`` and the plot ``gradcheck.png``.

    ep-gradcheck --preset small --betas 1e-3,1e-2
    ep-gradcheck --checkpoint runs/<name> --T1 300 --T2 100
    python -m ep_kernels.app.gradcheck --help

Exit status: 0 when every parameter tensor's cosine(EP, BPTT) is at least ``--min-cosine``
(default 0.9999, the bar the table flags) in every check; 1 when one is below it or NaN (the
failures are listed on stderr); 2 on a bad option or input file (one line on stderr,
``ep-gradcheck: error: ...``), found before anything is computed.
"""
import argparse
import json
import math
import os
import sys

import torch

from .. import backend_for
from ..gradcheck import format_table, gradcheck
from ..models import PRESETS, build_network
from ..relaxation import SCHEDULES
from .checkpoint import check_writable_folder, load_checkpoint
from .config import UsageError, attach_signals, check_beta, number, one_line
from .data import DATASETS, load_dataset


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


MIN_COSINE = 0.9999  # the bar of the issue and of the tests; format_table flags tensors below it


def _positive_floats(text):
    """argparse type: comma-separated positive finite numbers."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive finite numbers, got {text!r}")
    return vals


def _dtypes(text):
    """argparse type: comma-separated float64 / float32."""
    names = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in names if d not in ("float64", "float32")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected float64 and/or float32, got {text!r}")
    return [getattr(torch, d) for d in names]


def _cosine(text):
    v = number(float)(text)
    if not -1.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"a cosine lies in [-1, 1], got {text!r}")
    return v


def make_parser():
    p = argparse.ArgumentParser(
        prog="ep-gradcheck", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 when every parameter tensor's cosine(EP, BPTT) is at least --min-cosine in every "
               "check, 1 when one is below it (or not a number), 2 on a bad option or input file.")
    p.add_argument("--preset", default="small", choices=PRESETS, help="network preset (see ep-train --help)")
    p.add_argument("--width", type=number(float, 0, strict=True), default=0.25,
                   help="channel multiplier of the preset")
    p.add_argument("--activation", default="hardsigmoid_half", choices=["hardsigmoid", "hardsigmoid_half"])
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="relaxation schedule (default: the preset's, or the checkpoint's)")
    p.add_argument("--checkpoint", help="an ep-train run folder or checkpoint.pt: check the trained weights")
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch", type=number(int, 1), default=16)
    p.add_argument("--betas", type=_positive_floats, default="1e-3,1e-2", help="comma-separated; one check per beta")
    p.add_argument("--dtypes", type=_dtypes, default="float64,float32", help="comma-separated: float64, float32")
    p.add_argument("--T1", type=number(int, 1), default=300)
    p.add_argument("--T2", type=number(int, 1), default=100)
    p.add_argument("--nudging", default="symmetric", choices=["symmetric", "one-sided"])
    p.add_argument("--compute-dtype", default=None, choices=["bfloat16", "float16"],
                   help="relax with convolutions in this dtype (states stay in --dtypes); BPTT stays exact")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--no-gdu", action="store_true", help="skip the per-step curves (faster)")
    p.add_argument("--min-cosine", type=_cosine, default=MIN_COSINE,
                   help="the check fails (exit status 1) when a parameter tensor's cosine(EP, BPTT) is below this "
                        "in any check (default: %(default)s)")
    p.add_argument("--out", default="gradcheck", help="folder for report.json and gradcheck.png")
    return p


def main(argv=None):
    """Entry point of ``ep-gradcheck``; returns the exit status: 0 when every parameter
    tensor's cosine(EP, BPTT) is at least ``--min-cosine`` in every check, 1 otherwise, 2 on a
    bad option or input file (argparse's own errors raise SystemExit(2))."""
    p = make_parser()
    a = p.parse_args(argv)
    try:
        net, x, y = _prepare(a)
    except UsageError as e:
        p.exit(2, f"ep-gradcheck: error: {one_line(e, 2000)}\n")
    reports = run(net, x, y, a)
    failures = failed_params(reports, a.min_cosine)
    if failures:
        shown = "; ".join(failures[:6]) + (f"; and {len(failures) - 6} more" if len(failures) > 6 else "")
        print(f"ep-gradcheck: check failed: {len(failures)} parameter tensor{'s' if len(failures) > 1 else ''} "
              f"with cosine(EP, BPTT) below --min-cosine {a.min_cosine:g}: {shown}", file=sys.stderr)
        return 1
    print(f"ep-gradcheck: passed: cosine(EP, BPTT) >= {a.min_cosine:g} for every parameter tensor in "
          f"{len(reports)} check{'s' if len(reports) > 1 else ''}")
    return 0


def failed_params(reports, min_cosine):
    """``"beta=... dtype: name cosine"`` for every parameter tensor whose cosine is below
    ``min_cosine`` (or NaN) in ``reports``."""
    out = []
    for r in reports:
        c = r["config"]
        for name, v in r["params"].items():
            if not v["cosine"] >= min_cosine:  # NaN fails too
                out.append(f"beta={c['beta']:g} {c['dtype']} {name} {v['cosine']:.6f}")
    return out


def _prepare(a):
    """Every check of the options, then the network and the batch: UsageError before anything
    is computed or written."""
    if a.T2 > a.T1:
        raise UsageError(f"--T2 {a.T2} is larger than --T1 {a.T1}")
    try:
        backend_for(torch.device("cpu"))
    except (ValueError, RuntimeError) as e:
        raise UsageError(one_line(e))
    for dt in a.dtypes:
        for beta in a.betas:
            check_beta(beta, dt, a.batch, flag="--betas")
    check_writable_folder(a.out, "--out")
    torch.manual_seed(a.seed)
    try:  # a torchvision dataset without --data-dir, or one missing there: ValueError / RuntimeError
        data = load_dataset(a.dataset, a.data_dir)
    except (ValueError, RuntimeError) as e:
        raise UsageError(one_line(e))
    g = torch.Generator().manual_seed(a.seed)
    idx = torch.randperm(len(data.y_train), generator=g)[: a.batch]
    x, y = data.x_train[idx], data.y_train[idx]
    if a.checkpoint:
        net = load_network(a.checkpoint, data)
        if a.schedule is not None:
            net.schedule = a.schedule
    else:
        try:
            net = build_network(a.preset, data.in_shape, data.n_classes, activation=a.activation, width=a.width,
                                schedule=a.schedule)
        except (ValueError, TypeError) as e:
            raise UsageError(one_line(e))
    a.schedule = net.schedule  # recorded in report.json
    return net, x, y


def run(net, x, y, a):
    """One check per dtype and beta of the options ``a``: the table, report.json, gradcheck.png."""
    reports = []
    for dt in a.dtypes:
        for beta in a.betas:
            print(f"ep-gradcheck: beta={beta:g} dtype={str(dt).replace('torch.', '')} ...", file=sys.stderr, flush=True)
            reports.append(gradcheck(net, x, y, beta, a.T1, a.T2, a.nudging, dt, gdu=not a.no_gdu,
                                     compute_dtype=getattr(torch, a.compute_dtype) if a.compute_dtype else None))
    print(format_table(reports))
    os.makedirs(a.out, exist_ok=True)
    args = dict(vars(a), dtypes=[str(d).replace("torch.", "") for d in a.dtypes])
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump({"args": args, "min_cosine": a.min_cosine, "failed": failed_params(reports, a.min_cosine),
                   "reports": reports}, f, indent=1)
    plot(reports, os.path.join(a.out, "gradcheck.png"))
    print(f"wrote {os.path.join(a.out, 'report.json')} and {os.path.join(a.out, 'gradcheck.png')}")
    return reports


def load_network(path, data):
    """The network of an ``ep-train`` run (its folder or ``checkpoint.pt``) for ``data``, with
    the trained weights and the run's local classifiers (part of the cost it trained).
    UsageError when the checkpoint is missing, damaged, or does not fit."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UsageError(f"--checkpoint {path!r}: no such file (give an ep-train run folder or its checkpoint.pt)")
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    try:
        net = build_network(cfg.get("preset", "small"), data.in_shape, data.n_classes,
                            activation=cfg.get("activation", "hardsigmoid_half"), width=cfg.get("width"),
                            schedule=cfg.get("schedule") or cfg.get("schedule_used"))
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: cannot rebuild its network for this dataset: {one_line(e)}") from None
    if any(k.startswith("signals.") for k in ckpt["model"]):
        # The run's intermediate signals are part of the cost it trained: check EP of that cost.
        try:
            attach_signals(dict(cfg), net)
        except UsageError as e:
            raise UsageError(f"{path}: cannot rebuild the run's signals: {e}") from None
        if any(sig.kind in ("feature", "logit") for sig in net.signals):
            raise UsageError(f"{path}: the run trained with distillation signals, which need its teacher; "
                             "ep-gradcheck --checkpoint supports runs with local classifiers only")
    try:
        net.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(f"{path}: its weights do not fit the network of its config: {one_line(e, 240)}") from None
    return net


if __name__ == "__main__":
    sys.exit(main())
