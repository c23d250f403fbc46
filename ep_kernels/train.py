"""``ep-train``: train an EP network (or the same network by BPTT) and keep a run folder.

    ep-train                                   # the default: small ConvNet on the bundled digits
    ep-train --preset vgg5 --dataset cifar10 --data-dir ~/data --epochs 100 --T1 250 --T2 25
    ep-train --resume runs/<name>              # continue a stopped run exactly where it stopped

The run folder holds ``config.json``, ``metrics.json`` (one row per epoch), ``curves.png`` and
``checkpoint.pt``. The checkpoint is replaced atomically after every epoch and whenever the run
stops early (Ctrl-C, ``--max-minutes``); it holds the model, optimizer, scheduler, every random
generator's state and the position inside the epoch, so ``--resume`` continues bit for bit on
the same machine (CPU, same number of threads): 2 epochs + resume for 2 more = 4 epochs.

Ctrl-C: the first one lets the current minibatch finish, saves, and exits (status 130); a
second one stops at once and saves the state at the start of the interrupted minibatch (the
weights are only written by ``optimizer.step()``, which is never interrupted half-way by the
first Ctrl-C; if a raw interrupt lands inside it, the last checkpoint on disk is kept).
"""
import argparse
import copy
import json
import math
import os
import random
import signal
import sys
import threading
import time
from datetime import datetime

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as _dist
from .data import DATASETS, load_dataset
from .relaxation import SCHEDULES
from .models import PRESETS, build_network

# The defaults are the tuned configuration of the default run (small ConvNet, bundled digits,
# shift augmentation, 1 thread). Measured on a 2-core CPU: 2.2 min, 98.9% test accuracy (EP);
# --algorithm bptt 2.5 min, 98.3%. With 30 epochs the EP-BPTT gap reached 1.7 points for
# one seed; with 50 it stayed below 1 point over seeds 0-3. Change them only with new measurements.
DEFAULTS = dict(
    preset="small", width=1.0, activation="hardsigmoid_half", init_scale=None,
    dataset="digits", data_dir=None, download=False, augment=None, limit_train=None, limit_test=None,
    algorithm="ep", T1=30, T2=10, beta=0.5, nudging="symmetric", eval_T1=None, tol=None, schedule=None,
    epochs=50, batch_size=32, lr="0.05", momentum=0.9, weight_decay=0.0, cosine=True,
    seed=0, threads=None, device="cpu",
)

# Options that describe where/how this invocation runs, never stored as the run's config.
_FRESH = ("resume", "run_dir", "max_minutes", "no_progress", "dist_backend", "dist_timeout")
# Stored in the config, but a resumed run may change them (they do not change the maths,
# except threads, which can change float rounding: warned about).
_OVERRIDABLE = ("threads", "device", "data_dir", "download", "epochs")

EXIT_INTERRUPTED = 130
# Above this largest per-step change at the end of the free phase (epoch mean), ep-train says
# once that the phase has not converged: a change of 1e-2 in states that live in [0, 1].
UNCONVERGED = 1e-2


class UsageError(ValueError):
    """A bad option or option combination; ``main`` reports it like an argparse error."""


# --- command line ------------------------------------------------------------------------

def _typed(kind, lo=None, strict=False, allow_none=False):
    def parse(text):
        if allow_none and text.lower() == "none":
            return None
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a{'n int' if kind is int else ' number'}, got {text!r}")
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if lo is not None and (v <= lo if strict else v < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lo}, got {text!r}")
        return v
    return parse


def parse_lrs(text):
    """``"0.1"`` or ``"0.2,0.1,0.05"`` -> list of positive floats."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}")
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"learning rates must be positive and finite, got {text!r}")
    return vals


def _lr_arg(text):
    parse_lrs(text)  # validate; keep the text (it goes to config.json as given)
    return text.replace(" ", "")


def make_parser():
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="ep-train", allow_abbrev=False,
        description="Train an Equilibrium Propagation network (or the same network by BPTT).",
        epilog="Example: ep-train --preset vgg5 --dataset cifar10 --data-dir ~/data --epochs 100 --T1 250 --T2 25")
    g = p.add_argument_group("network")
    g.add_argument("--preset", choices=PRESETS, default=d["preset"], help="network (default: %(default)s)")
    g.add_argument("--width", type=_typed(float, 0, strict=True), default=d["width"],
                   help="multiply the preset's channel/unit counts (default: %(default)s)")
    g.add_argument("--activation", choices=("hardsigmoid", "hardsigmoid_half"), default=d["activation"],
                   help="clamp(x, 0, 1) or clamp(x/2, 0, 1) (default: %(default)s)")
    g.add_argument("--init-scale", type=_typed(float, 0, strict=True), default=d["init_scale"],
                   help="multiply PyTorch's default initial weights (default: 1; deep presets: 3 with "
                        "hardsigmoid_half, 1.5 with hardsigmoid, on filters centred per output channel, see "
                        "ep_kernels/models.py)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d["dataset"],
                   help="digits (bundled, no download) or a torchvision dataset in --data-dir "
                        "(default: %(default)s)")
    g.add_argument("--data-dir", default=d["data_dir"], help="folder in torchvision's layout")
    g.add_argument("--download", action="store_true", help="let torchvision download into --data-dir")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="training augmentation: random shifts (digits, MNIST), random crop + flip (CIFAR) "
                        "(default: on for digits and CIFAR, off for MNIST and Fashion-MNIST)")
    g.add_argument("--limit-train", type=_typed(int, 1), default=None, metavar="N",
                   help="use only the first N training examples (quick runs, tests)")
    g.add_argument("--limit-test", type=_typed(int, 1), default=None, metavar="N",
                   help="use only the first N test examples")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algorithm", choices=("ep", "bptt"), default=d["algorithm"],
                   help="EP gradient estimate, or backprop through the T1 free steps (default: %(default)s)")
    g.add_argument("--T1", type=_typed(int, 1), default=d["T1"], help="free-phase steps (default: %(default)s)")
    g.add_argument("--T2", type=_typed(int, 1), default=d["T2"], help="nudged-phase steps (default: %(default)s)")
    g.add_argument("--beta", type=_typed(float, 0, strict=True), default=d["beta"],
                   help="nudging strength (default: %(default)s)")
    g.add_argument("--nudging", choices=("symmetric", "one-sided", "random-sign"), default=d["nudging"],
                   help="default: %(default)s")
    g.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"],
                   help="relaxation step: all layers from the same old states, or odd-numbered layers then "
                        "even-numbered ones (converges where synchronous updates oscillate) (default: "
                        "alternating for the deep presets vgg11/13/16 and deep8, synchronous otherwise)")
    g.add_argument("--eval-T1", type=_typed(int, 1), default=None,
                   help="free-phase steps at evaluation (default: --T1)")
    g.add_argument("--tol", type=_typed(float, 0, strict=True), default=None,
                   help="stop a phase early once every layer's max change is below this")
    g = p.add_argument_group("optimisation (SGD)")
    g.add_argument("--epochs", type=_typed(int, 1), default=d["epochs"], help="default: %(default)s")
    g.add_argument("--batch-size", type=_typed(int, 1), default=d["batch_size"], help="default: %(default)s")
    g.add_argument("--lr", type=_lr_arg, default=d["lr"],
                   help="learning rate, or one per layer then the readout, comma-separated "
                        "(e.g. 0.2,0.1,0.05) (default: %(default)s)")
    g.add_argument("--momentum", type=_typed(float, 0), default=d["momentum"], help="default: %(default)s")
    g.add_argument("--weight-decay", type=_typed(float, 0), default=d["weight_decay"], help="default: %(default)s")
    g.add_argument("--cosine", action=argparse.BooleanOptionalAction, default=d["cosine"],
                   help="cosine learning-rate schedule over the epochs (default: on)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=_typed(int, 0), default=d["seed"], help="default: %(default)s")
    g.add_argument("--threads", type=_typed(int, 1), default=None,
                   help="torch CPU threads (default: 1 for the small presets 'small' and 'mlp', whose tiny "
                        "ops gain little from threads and slow down badly when other processes share the "
                        "cores; torch's default otherwise). Recorded in config.json, so a resume uses the same")
    g.add_argument("--device", default=d["device"], help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    g.add_argument("--run-dir", default=None,
                   help="run folder (default: runs/<date-time>-<preset>-<dataset>-<algorithm>)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR with its own config (--epochs may extend it)")
    g.add_argument("--max-minutes", type=_typed(float, 0, strict=True), default=None,
                   help="stop cleanly (saving) after this much wall-clock time; resume later")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    _add_signal_options(p)
    _add_distributed_options(p)
    return p


def _add_distributed_options(p):
    """Options of a data-parallel run under torchrun (ep_kernels/distributed.py)."""
    g = p.add_argument_group("several processes (under torchrun; ignored otherwise)")
    g.add_argument("--dist-backend", choices=("gloo", "nccl"), default=None,
                   help="torch.distributed backend (default: nccl for --device cuda, gloo on CPU)")
    g.add_argument("--dist-timeout", type=_typed(float, 0, strict=True), default=None, metavar="SECONDS",
                   help="give up on a collective (all-reduce) after this long, e.g. when a peer hangs "
                        "(default: torch's)")


def _explicit_options(parser, argv):
    """The dests of options written on the command line (abbreviations are disabled)."""
    flags = {}
    for a in parser._actions:
        for s in a.option_strings:
            flags[s] = a.dest
    given = set()
    for tok in argv:
        if tok.startswith("--"):
            name = tok.split("=", 1)[0]
            if name in flags:
                given.add(flags[name])
    return given


# --- run folder, checkpoint ----------------------------------------------------------------

def _write_atomic(path, write):
    """Write through a temporary file in the same folder, then rename over ``path``: a reader
    (or a crash) sees the old file or the new one, never half of one."""
    if not _dist.is_writer():  # data-parallel run: only rank 0 writes the run folder
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path, obj):
    _write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _capture_rng(gen, device):
    # Everything as tensors, lists and numbers, so torch.load(weights_only=True) reads it.
    npst = np.random.get_state()
    pyst = random.getstate()
    st = {
        "torch": torch.get_rng_state(),
        "data": gen.get_state(),
        "numpy": [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]),
                  float(npst[4])],
        "python": [pyst[0], list(pyst[1]), pyst[2]],
    }
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _restore_rng(st, gen, device):
    torch.set_rng_state(st["torch"])
    gen.set_state(st["data"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def load_checkpoint(path):
    """A checkpoint written by ``ep-train`` (plain tensors/containers: ``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# --- metrics ---------------------------------------------------------------------------------

def _flatten_numbers(d, prefix=""):
    """Nested diagnostics -> {"a.b": float or [floats]}; strings and other values are skipped."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_numbers(v, key + "."))
            continue
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().tolist()
        if isinstance(v, (bool, int, float)):
            out[key] = float(v)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(e, (bool, int, float, torch.Tensor)) for e in v):
            out[key] = [float(e) for e in v]
    return out


def _new_partial():
    return {"loss_sum": 0.0, "correct": 0, "count": 0, "diag": {}, "seconds": 0.0}


def _accumulate(partial, res, y):
    n = y.shape[0]
    partial["loss_sum"] += float(res.loss) * n
    partial["correct"] += int((res.logits.argmax(1) == y.to(res.logits.device)).sum())
    partial["count"] += n
    for k, v in _flatten_numbers(res.diagnostics or {}).items():
        if k not in partial["diag"]:
            partial["diag"][k] = [v, 1]
            continue
        s, c = partial["diag"][k]
        if isinstance(v, list) and isinstance(s, list) and len(v) == len(s):
            partial["diag"][k] = [[a + b for a, b in zip(s, v)], c + 1]
        elif isinstance(v, float) and isinstance(s, float):
            partial["diag"][k] = [s + v, c + 1]


def _diag_means(partial):
    out = {}
    for k, (s, c) in partial["diag"].items():
        out[k] = [v / c for v in s] if isinstance(s, list) else s / c
    return out


def _output_loss(net, out, y):
    if net.mode == "ce":
        return F.cross_entropy(out, y, reduction="sum")
    return 0.5 * (out - F.one_hot(y, out.shape[1]).to(out.dtype)).pow(2).sum()


def evaluate(net, x, y, T1, device, batch_size=500):
    """Mean loss and accuracy of the free equilibrium after ``T1`` steps."""
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            out = net(xb, T1=T1)
            loss += float(_output_loss(net, out, yb))
            correct += int((out.argmax(1) == yb).sum())
    n = x.shape[0]
    return loss / n, correct / n


def plot_curves(path, history, title=""):
    """Loss and accuracy per epoch (train and test), and the nudge magnitudes per layer if any."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    ep = [r["epoch"] for r in history]
    nudge = [r.get("diagnostics", {}).get("nudge_magnitude") for r in history]
    has_nudge = all(isinstance(v, list) for v in nudge) and nudge
    fig = Figure(figsize=(13 if has_nudge else 9, 3.8), layout="constrained")
    axes = fig.subplots(1, 3 if has_nudge else 2)
    ax = axes[0]
    ax.plot(ep, [r["train_loss"] for r in history], "o-", ms=3, label="train")
    ax.plot(ep, [r["test_loss"] for r in history], "o-", ms=3, label="test")
    ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot(ep, [100 * r["train_acc"] for r in history], "o-", ms=3, label="train")
    ax.plot(ep, [100 * r["test_acc"] for r in history], "o-", ms=3, label="test")
    ax.set_xlabel("epoch"), ax.set_ylabel("accuracy (%)"), ax.legend(), ax.grid(alpha=0.3)
    if has_nudge:
        ax = axes[2]
        for l in range(len(nudge[0])):
            ax.plot(ep, [v[l] for v in nudge], "o-", ms=3, label=f"layer {l + 1}")
        ax.set_xlabel("epoch"), ax.set_ylabel("mean |s+ - s*|"), ax.set_yscale("log"), ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))


def _summary(history):
    if not history:
        return {"epochs_done": 0}
    best = max(history, key=lambda r: r["test_acc"])
    return {"epochs_done": len(history), "final_test_acc": history[-1]["test_acc"],
            "best_test_acc": best["test_acc"], "best_epoch": best["epoch"]}


# --- intermediate signals, teacher, diagnostics plot (DESIGN.md section 4) ----------------------
# Every choice is an option stored in config.json (the paper's method is not fully public);
# what was actually attached is recorded too (cfg["signals_used"], cfg["teacher_file"]).

SIGNAL_DEFAULTS = dict(
    signals="none", signal_layers="auto", lambdas="1.0", tau=4.0, signal_pool=1,
    teacher=None, train_teacher=False, teacher_epochs=10, teacher_lr=0.05,
)
DEFAULTS.update(SIGNAL_DEFAULTS)  # stored in the run's config like every other option
TEACHER_FILE = "teacher.pt"  # where --train-teacher saves the teacher, in the run folder


def _add_signal_options(p):
    d = SIGNAL_DEFAULTS
    g = p.add_argument_group("intermediate signals and distillation (DESIGN.md section 4)")
    g.add_argument("--signals", default=d["signals"],
                   help="extra cost terms: classifier (local classifier heads), feature (feature distillation "
                        "to a teacher through 1x1 maps), logit (KD at the readout), comma-separated, or none "
                        "(default: %(default)s)")
    g.add_argument("--signal-layers", default=d["signal_layers"],
                   help="where classifier/feature signals attach: auto (the end of every block but the top "
                        "layer) or comma-separated layer indices (default: %(default)s)")
    g.add_argument("--lambda", dest="lambdas", default=d["lambdas"],
                   help="signal weight: one value, or one per --signals kind in that order (default: %(default)s)")
    g.add_argument("--tau", type=_typed(float, 0, strict=True), default=d["tau"],
                   help="logit distillation temperature (default: %(default)s)")
    g.add_argument("--signal-pool", type=_typed(int, 1), default=d["signal_pool"],
                   help="local classifier heads read the state average-pooled to this size (default: %(default)s)")
    g.add_argument("--teacher", default=d["teacher"], metavar="PATH",
                   help="a saved teacher (ep_kernels.teacher.save_teacher) for feature/logit distillation")
    g.add_argument("--train-teacher", action="store_true",
                   help=f"first train the feed-forward teacher by backprop (--teacher-epochs), save it as "
                        f"{TEACHER_FILE} in the run folder, then use it")
    g.add_argument("--teacher-epochs", type=_typed(int, 1), default=d["teacher_epochs"],
                   help="default: %(default)s")
    g.add_argument("--teacher-lr", type=_typed(float, 0, strict=True), default=d["teacher_lr"],
                   help="teacher SGD learning rate (default: %(default)s)")


def _check_signal_options(cfg):
    """Parsed signal kinds, layers and weights of ``cfg``; UsageError on bad combinations."""
    from .models import parse_signal_kinds, parse_signal_layers
    try:
        kinds = parse_signal_kinds(cfg["signals"])
        layers = parse_signal_layers(cfg["signal_layers"])
    except ValueError as e:
        raise UsageError(str(e))
    try:
        lambdas = [float(v) for v in str(cfg["lambdas"]).split(",")]
    except ValueError:
        raise UsageError(f"--lambda: expected a number or comma-separated numbers, got {cfg['lambdas']!r}")
    if not all(math.isfinite(v) and v > 0 for v in lambdas):
        raise UsageError(f"--lambda: weights must be positive and finite, got {cfg['lambdas']!r}")
    distill = [k for k in kinds if k in ("feature", "logit")]
    if cfg["teacher"] is not None and cfg["train_teacher"]:
        raise UsageError("give either --teacher PATH or --train-teacher, not both")
    if distill and cfg["teacher"] is None and not cfg["train_teacher"]:
        raise UsageError(f"--signals {','.join(distill)} (distillation) needs a teacher: --teacher PATH (a saved "
                         "teacher) or --train-teacher (train one by backprop first)")
    if not distill and (cfg["teacher"] is not None or cfg["train_teacher"]):
        raise UsageError("--teacher/--train-teacher are only used by distillation signals: add --signals feature "
                         "and/or logit")
    if cfg["teacher"] is not None and not os.path.isfile(cfg["teacher"]):
        raise UsageError(f"--teacher {cfg['teacher']!r}: no such file")
    if kinds and cfg["algorithm"] not in ("ep", "bptt"):
        raise UsageError(f"--signals needs --algorithm ep or bptt, got {cfg['algorithm']!r}")
    return kinds, layers, lambdas


def _attach_signals(cfg, net):
    """Attach the configured signals to ``net`` (before the optimizer is built, so their heads
    and maps get their own parameter group) and record what was attached in ``cfg``."""
    from .models import build_signals
    kinds, layers, lambdas = _check_signal_options(cfg)
    if not kinds:
        cfg["signals_used"] = []
        return
    try:
        sigs = build_signals(net, kinds, layers, lambdas if len(lambdas) > 1 else lambdas[0], tau=cfg["tau"],
                             pool_size=cfg["signal_pool"])
    except ValueError as e:
        raise UsageError(str(e))
    cfg["signals_used"] = [dict({"kind": s.kind, "layer": s.layer, "weight": s.weight},
                                **({"tau": s.tau} if s.kind == "logit" else {})) for s in sigs]


def _prepare_teacher(cfg, net, data, device, run_dir, resumed):
    """The teacher for distillation (None without distillation signals): loaded from
    ``--teacher``, or trained by backprop into the run folder (``--train-teacher``; a resumed
    run loads the one it saved). Teacher training does not touch the run's random state."""
    from .teacher import Teacher, evaluate as teacher_eval, load_teacher, save_teacher, train_teacher
    if not any(s.kind in ("feature", "logit") for s in net.signals):
        return None
    teacher = None
    if cfg["train_teacher"]:
        path = os.path.join(run_dir, TEACHER_FILE)
        if not os.path.isfile(path):
            if resumed:
                print(f"ep-train: note: {path} is missing; training the teacher again", file=sys.stderr)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                teacher = Teacher.like(net, seed=cfg["seed"]).to(device)
                accs = train_teacher(teacher, data, epochs=cfg["teacher_epochs"], lr=cfg["teacher_lr"],
                                     seed=cfg["seed"], progress=False,
                                     log=lambda m: print(f"ep-train: {m}", file=sys.stderr))
            # Every rank trains the same teacher (same seed, same data); only rank 0 writes it,
            # atomically, and every rank keeps its own copy in memory (no read-after-write race).
            trained = teacher.cpu()
            if _dist.is_writer():
                tmp = path + ".tmp"
                save_teacher(trained, tmp, meta={"preset": cfg["preset"], "width": cfg["width"],
                                                 "dataset": cfg["dataset"], "epochs": cfg["teacher_epochs"],
                                                 "lr": cfg["teacher_lr"], "test_acc": accs})
                os.replace(tmp, path)
            trained.eval()
            for p in trained.parameters():
                p.requires_grad_(False)
            teacher = trained.to(device)
    else:
        path = cfg["teacher"]
    try:
        if teacher is None:  # not trained in this process: load it (weights_only)
            teacher = load_teacher(path, net).to(device)
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise UsageError(f"teacher {path!r}: {e}")
    cfg["teacher_file"] = os.path.abspath(path)
    if "teacher_test_acc" not in cfg:
        cfg["teacher_test_acc"] = teacher_eval(teacher, data.x_test.to(device), data.y_test.to(device))
        print(f"ep-train: teacher {path}: test accuracy {100 * cfg['teacher_test_acc']:.2f}%", file=sys.stderr)
    return teacher


def plot_diagnostics(path, history, title=""):
    """The paper's diagnostics over training: per layer, the epoch means of |s+ - s*| and of
    |g_theta| (log scale). Nothing is written when the history has none (BPTT)."""
    from matplotlib.figure import Figure

    rows = [r.get("diagnostics", {}) for r in history]
    keys = [k for k in ("nudge_magnitude", "grad_magnitude") if rows and all(isinstance(d.get(k), list) for d in rows)]
    if not keys:
        return
    ep = [r["epoch"] for r in history]
    fig = Figure(figsize=(5.5 * len(keys), 3.8), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    labels = {"nudge_magnitude": "mean |s+ - s*|", "grad_magnitude": "mean |g_theta|"}
    for ax, k in zip(axes, keys):
        for l in range(len(rows[0][k])):
            ax.plot(ep, [max(d[k][l], 1e-30) for d in rows], "o-", ms=3, label=f"layer {l}")
        ax.set_xlabel("epoch"), ax.set_ylabel(labels[k]), ax.set_yscale("log"), ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))


# --- the run ---------------------------------------------------------------------------------

def make_optimizer(net, lrs, momentum, weight_decay):
    """SGD with one parameter group per state layer, then the readout (then any auxiliary heads).

    ``lrs`` is one learning rate for all groups or one per group, in that order.
    """
    groups = [(f"layers.{i}", list(layer.parameters())) for i, layer in enumerate(net.layers)]
    if net.readout is not None:
        groups.append(("readout", list(net.readout.parameters())))
    signals = getattr(net, "signals", None)  # training-only heads of DESIGN.md section 4
    if signals is not None and len(list(signals.parameters())):
        groups.append(("signals", list(signals.parameters())))
    covered = {id(p) for _, ps in groups for p in ps}
    rest = [p for p in net.parameters() if id(p) not in covered]
    if rest:  # anything else: its own, last group
        groups.append(("other", rest))
    names = [n for n, _ in groups]
    if len(lrs) == 1:
        lrs = lrs * len(groups)
    elif len(lrs) != len(groups):
        raise UsageError(f"--lr has {len(lrs)} values but this network has {len(groups)} parameter groups "
                         f"({', '.join(names)}): give one learning rate, or one per group in that order")
    return torch.optim.SGD([{"params": ps, "lr": lr, "name": n} for (n, ps), lr in zip(groups, lrs)],
                           lr=lrs[0], momentum=momentum, weight_decay=weight_decay)


class _StopRequest:
    """Turns the first SIGINT into a request to stop at the next safe point."""

    def __init__(self):
        self.requested = False
        self._installed = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("\nep-train: Ctrl-C: finishing this minibatch, then saving a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        # Signal handlers can only be set from the main thread; elsewhere Ctrl-C arrives as a
        # plain KeyboardInterrupt, which is handled too (see the module docstring).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            # None: the previous handler was not set from Python; Python's own is the best guess.
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)


def _default_run_dir(cfg):
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{stamp}-{cfg['preset']}-{cfg['dataset']}-{cfg['algorithm']}")
    path, i = base, 1
    while os.path.exists(path):
        i += 1
        path = f"{base}-{i}"
    return path


def _resolve(parser, argv):
    """(config, run folder, checkpoint or None) from the command line; checks a resume's options."""
    args = parser.parse_args(argv)
    given = _explicit_options(parser, argv)
    if args.resume is None:
        cfg = _resolve_threads({k: getattr(args, k) for k in DEFAULTS})
        run_dir = args.run_dir or _default_run_dir(cfg)
        if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
            raise UsageError(f"--run-dir {run_dir!r} already holds a run: continue it with --resume {run_dir}, "
                             "or choose another --run-dir")
        return cfg, run_dir, None

    run_dir = args.resume
    if args.run_dir is not None and os.path.abspath(args.run_dir) != os.path.abspath(run_dir):
        raise UsageError("--resume continues in its own folder; do not also give a different --run-dir")
    cfg_path, ckpt_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "checkpoint.pt")
    for path in (cfg_path, ckpt_path):
        if not os.path.isfile(path):
            raise UsageError(f"--resume {run_dir!r}: no {os.path.basename(path)} there (not an ep-train run folder)")
    with open(cfg_path) as f:
        cfg = json.load(f)["config"]
    for k in DEFAULTS:  # a config from an older version may lack newer options
        cfg.setdefault(k, DEFAULTS[k])
    for k in sorted(given - set(_FRESH)):
        new = getattr(args, k)
        if k in _OVERRIDABLE:
            if k == "epochs" and new != cfg["epochs"] and cfg["cosine"]:
                raise UsageError(f"--epochs {new}: this run uses --cosine, whose schedule is fixed by its "
                                 f"{cfg['epochs']} epochs; it cannot be extended")
            if k == "threads" and new != cfg["threads"]:
                print(f"ep-train: note: --threads {new} differs from the run's {cfg['threads']}; the result "
                      "may differ from an uninterrupted run in the last bits", file=sys.stderr)
            cfg[k] = new
        elif new != cfg[k]:
            flag = "--" + k.replace("_", "-")
            raise UsageError(f"{flag} {new!r} differs from the run's config ({cfg[k]!r}): a resumed run keeps "
                             f"its config (only {', '.join('--' + o.replace('_', '-') for o in _OVERRIDABLE)} "
                             "may change)")
    ckpt = load_checkpoint(ckpt_path)
    return cfg, run_dir, ckpt


def main(argv=None):
    """Entry point of ``ep-train``; returns the exit status (0, or 130 when interrupted)."""
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, run_dir, ckpt = _resolve(parser, argv)
        args = parser.parse_args(argv)
        with _dist.session(cfg, run_dir, args.dist_backend, args.dist_timeout) as (cfg, run_dir):
            return train(cfg, run_dir, ckpt, max_minutes=args.max_minutes,
                         progress=not args.no_progress and _dist.is_writer(), argv=argv)
    except UsageError as e:
        parser.error(str(e))
    except FloatingPointError as e:  # divergence (NaN loss or states): a message, not a traceback
        print(f"ep-train: error: {e}", file=sys.stderr)
        return 1


def _resolve_threads(cfg):
    """The thread count of a new run: part of its config, because the float rounding (and so
    a bitwise-exact resume) depends on it."""
    if cfg["threads"] is None:
        small = cfg["preset"] in ("small", "mlp") and cfg["device"] == "cpu"
        # One thread for small networks: measured on 2 cores, the default run takes 1.4 s an
        # epoch with 2 threads and 2.4 s with 1 on an idle machine, but 2 threads slow down
        # to 20-130 s an epoch when another process is busy (OpenMP workers wait on each
        # other for every small op); one thread only shares its core.
        cfg["threads"] = 1 if small else torch.get_num_threads()
    return cfg


def _setup(cfg):
    """Data, network, optimizer, scheduler for ``cfg`` (a fresh run's initial state)."""
    if cfg["threads"] is not None:
        torch.set_num_threads(cfg["threads"])
    try:
        device = _dist.local_device(torch.device(cfg["device"]))  # cuda -> cuda:LOCAL_RANK under torchrun
    except RuntimeError as e:
        raise UsageError(f"--device {cfg['device']!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg['device']}: CUDA is not available on this machine")
    if cfg["dataset"] != "digits" and cfg["data_dir"] is None:
        raise UsageError(f"--dataset {cfg['dataset']} needs --data-dir (a folder in torchvision's layout)")
    try:
        data = load_dataset(cfg["dataset"], cfg["data_dir"], cfg["download"], cfg["augment"])
        data = data.limit(cfg["limit_train"], cfg["limit_test"])
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e))

    # Seed everything the run may draw from; shuffling and augmentation use their own
    # generator, so the data order does not depend on what the algorithm draws.
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"] % 2**32)
    random.seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    try:
        net = build_network(cfg["preset"], data.in_shape, data.n_classes, activation=cfg["activation"],
                            init_scale=cfg["init_scale"], width=cfg["width"], T1=cfg["T1"], T2=cfg["T2"],
                            beta=cfg["beta"], nudging=cfg["nudging"], tol=cfg["tol"],
                            # a resumed run keeps the schedule it started with, even if the preset's default changed
                            schedule=cfg.get("schedule") or cfg.get("schedule_used"))
    except ValueError as e:
        raise UsageError(str(e))
    cfg["schedule_used"], cfg["centred_init_scale"] = net.schedule, net.centred_init_scale
    _attach_signals(cfg, net)  # before the optimizer: heads and maps are trained too
    net.to(device)
    opt = make_optimizer(net, parse_lrs(cfg["lr"]), cfg["momentum"], cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"]) if cfg["cosine"] else None
    return device, data, gen, net, opt, sched


def train(cfg, run_dir, ckpt=None, max_minutes=None, progress=True, argv=()):
    """Train with config ``cfg`` in ``run_dir``; from checkpoint ``ckpt`` when resuming.

    Returns 0 when done or stopped by ``max_minutes``, ``EXIT_INTERRUPTED`` after Ctrl-C.
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, run_dir, ckpt, max_minutes, progress, argv)
    finally:
        torch.set_num_threads(threads)  # --threads is for this run, not for the caller's process


def _train(cfg, run_dir, ckpt, max_minutes, progress, argv):
    from tqdm.auto import tqdm

    t_start = time.monotonic()
    device, data, gen, net, opt, sched = _setup(cfg)
    os.makedirs(run_dir, exist_ok=True)
    teacher = _prepare_teacher(cfg, net, data, device, run_dir, resumed=ckpt is not None)
    paths = {k: os.path.join(run_dir, f) for k, f in
             (("config", "config.json"), ("metrics", "metrics.json"), ("curves", "curves.png"),
              ("ckpt", "checkpoint.pt"))}

    # Progress: position in the run, and the running sums of the current epoch.
    state = {"epoch": 0, "batch": 0, "perm": None, "partial": _new_partial(), "history": []}
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None:
            sched.load_state_dict(ckpt["scheduler"])
        for k in state:
            state[k] = ckpt[k]
        _restore_rng(ckpt["rng"], gen, device)
        print(f"ep-train: resuming {run_dir} at epoch {state['epoch'] + 1}, minibatch {state['batch']}",
              file=sys.stderr)

    def snapshot():
        # Taken only at safe points: model, optimizer and scheduler are not modified between
        # one safe point and the next commit, so live weights + this snapshot = a consistent state.
        return {"epoch": state["epoch"], "batch": state["batch"], "perm": state["perm"],
                "partial": copy.deepcopy(state["partial"]), "history": list(state["history"]),
                "rng": _capture_rng(gen, device)}

    def save(snap):
        ck = dict(snap, format=1, config=cfg, model=net.state_dict(), optimizer=opt.state_dict(),
                  scheduler=sched.state_dict() if sched is not None else None)
        _write_atomic(paths["ckpt"], lambda f: torch.save(ck, f))

    def write_metrics(status):
        _write_json(paths["metrics"], dict(_summary(state["history"]), status=status, epochs=state["history"]))

    from . import __version__
    from ._backend import backend_for
    invocations = []
    if ckpt is not None and os.path.isfile(paths["config"]):
        with open(paths["config"]) as f:
            invocations = json.load(f).get("invocations", [])
    _write_json(paths["config"], {
        "config": cfg, "invocations": invocations + [list(argv)],
        "environment": {"ep_kernels": __version__, "torch": torch.__version__, "backend": backend_for(device),
                        "threads": torch.get_num_threads(), "python": sys.version.split()[0]}})
    safe = snapshot()
    if ckpt is None:
        save(safe)  # so that an interrupt during the first epoch leaves a resumable run

    n_train = data.x_train.shape[0]
    bs = cfg["batch_size"]
    n_batches = math.ceil(n_train / bs)
    eval_T1 = cfg["eval_T1"] or cfg["T1"]
    title = (f"{cfg['preset']} on {cfg['dataset']}, {cfg['algorithm']}, T1={cfg['T1']} T2={cfg['T2']} "
             f"beta={cfg['beta']} {cfg['nudging']}, lr={cfg['lr']}")

    def step(x, y):
        if cfg["algorithm"] == "bptt":
            return net.bptt_backward(x, y, T1=cfg["T1"], teacher=teacher)
        return net.ep_backward(x, y, beta=cfg["beta"], T1=cfg["T1"], T2=cfg["T2"], nudging=cfg["nudging"],
                               tol=cfg["tol"], teacher=teacher)

    ddp = _dist.current()
    if ddp is not None:  # data-parallel: this rank's slice of the batch, gradients all-reduced
        step = ddp.wrap_step(step, net)

    def out_of_time():
        return max_minutes is not None and time.monotonic() - t_start > 60.0 * max_minutes

    stop = None  # None, "interrupt" or "time"
    warned_unconverged = False
    committing = False
    bar = None
    try:
        with _StopRequest() as stop_request:
            while state["epoch"] < cfg["epochs"] and stop is None:
                e = state["epoch"]
                if state["perm"] is None:
                    state["perm"] = torch.randperm(n_train, generator=gen)
                net.train()
                t0, sec0 = time.monotonic(), state["partial"]["seconds"]
                bar = tqdm(total=n_batches, initial=state["batch"], desc=f"epoch {e + 1}/{cfg['epochs']}",
                           disable=not progress, leave=False, dynamic_ncols=True)
                while state["batch"] < n_batches:
                    k = state["batch"]
                    idx = state["perm"][k * bs:(k + 1) * bs]
                    x, y = data.x_train[idx], data.y_train[idx]
                    if data.augment is not None:
                        x = data.augment(x, gen)
                    x, y = x.to(device), y.to(device)
                    opt.zero_grad(set_to_none=True)
                    res = step(x, y)
                    if not math.isfinite(float(res.loss)):
                        raise FloatingPointError(
                            f"training diverged at epoch {e + 1}, minibatch {k}: the loss is {float(res.loss)}; "
                            "try a smaller --lr or --beta (the last good checkpoint is in the run folder)")
                    committing = True
                    opt.step()
                    _accumulate(state["partial"], res, y)
                    state["batch"] = k + 1
                    state["partial"]["seconds"] = sec0 + time.monotonic() - t0
                    committing = False
                    safe = snapshot()
                    p = state["partial"]
                    bar.update(1)
                    bar.set_postfix(loss=f"{p['loss_sum'] / p['count']:.3f}",
                                    acc=f"{100 * p['correct'] / p['count']:.1f}%")
                    stop = _dist.stop_reason(stop_request.requested, out_of_time())  # all ranks agree
                    if stop is not None:
                        break
                bar.close()
                if stop is not None:
                    break

                # End of the epoch: evaluate, record, step the schedule, save.
                t1 = time.monotonic()
                if ddp is not None:  # each rank evaluates its slice of the test set
                    test_loss, test_acc = ddp.evaluate(evaluate, net, data.x_test, data.y_test, eval_T1, device)
                else:
                    test_loss, test_acc = evaluate(net, data.x_test, data.y_test, eval_T1, device)
                p = state["partial"]
                row = {"epoch": e + 1, "train_loss": p["loss_sum"] / p["count"], "train_acc": p["correct"] / p["count"],
                       "test_loss": test_loss, "test_acc": test_acc, "lr": [g["lr"] for g in opt.param_groups],
                       "train_seconds": p["seconds"], "seconds": p["seconds"] + time.monotonic() - t1,
                       "diagnostics": _diag_means(p)}
                committing = True
                state["history"].append(row)
                if sched is not None:
                    sched.step()
                state.update(epoch=e + 1, batch=0, perm=None, partial=_new_partial())
                committing = False
                safe = snapshot()
                save(safe)
                write_metrics("running")
                plot_curves(paths["curves"], state["history"], title)
                plot_diagnostics(os.path.join(run_dir, "diagnostics.png"), state["history"], title)
                line = (f"epoch {e + 1}/{cfg['epochs']}  train loss {row['train_loss']:.4f} acc "
                        f"{100 * row['train_acc']:.2f}%  test loss {test_loss:.4f} acc {100 * test_acc:.2f}%  "
                        f"lr {row['lr'][0]:.4g}  {row['seconds']:.1f}s")
                free_res = row["diagnostics"].get("free.residual")
                if free_res:
                    line += f"  free residual {max(free_res):.1e}"
                (tqdm.write if progress else print)(line)
                if free_res and max(free_res) > UNCONVERGED and not warned_unconverged:
                    warned_unconverged = True
                    (tqdm.write if progress else print)(
                        f"ep-train: note: the free phase ends short of a fixed point (largest change in its last "
                        f"step {max(free_res):.2g}, epoch mean; T1={cfg['T1']}, {net.schedule} schedule), so EP's "
                        "gradient departs from BPTT's; `ep-gradcheck --checkpoint RUN_DIR` measures by how much. "
                        "More --T1 brings it closer, and --schedule alternating converges where synchronous "
                        "updates oscillate.")
                stop = _dist.stop_reason(stop_request.requested, out_of_time() and state["epoch"] < cfg["epochs"])
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        stop = "interrupt"
        if committing:
            # Cut inside optimizer.step() or the bookkeeping after it: the live state is not
            # consistent; the checkpoint on disk (the last safe point saved) stands.
            print("ep-train: interrupted while updating the weights; keeping the last saved checkpoint",
                  file=sys.stderr)
            safe = None
    elapsed = time.monotonic() - t_start

    if stop is not None:
        if safe is not None:
            save(safe)
            where = (f"after epoch {safe['epoch']}" if safe["batch"] == 0 else
                     f"in epoch {safe['epoch'] + 1} after minibatch {safe['batch']} of {n_batches}")
        else:
            where = "at its last save"
        write_metrics("interrupted" if stop == "interrupt" else "stopped (--max-minutes)")
        why = "interrupted" if stop == "interrupt" else f"stopped after the --max-minutes {max_minutes:g} budget"
        print(f"ep-train: {why}; checkpoint saved {where} in {run_dir}.\n"
              f"Resume with:  ep-train --resume {run_dir}", file=sys.stderr)
        s = _summary(state["history"])
        if s["epochs_done"]:
            n = s["epochs_done"]
            print(f"ep-train: so far {n} epoch{'s' if n != 1 else ''}: final test accuracy "
                  f"{100 * s['final_test_acc']:.2f}%, best {100 * s['best_test_acc']:.2f}% (epoch {s['best_epoch']})")
        return EXIT_INTERRUPTED if stop == "interrupt" else 0

    write_metrics("done")
    s = _summary(state["history"])
    if s["epochs_done"]:
        print(f"ep-train: done, {s['epochs_done']} epochs ({cfg['algorithm']}, {cfg['preset']} on {cfg['dataset']}) "
              f"in {elapsed / 60:.1f} min this session: final test accuracy {100 * s['final_test_acc']:.2f}%, best "
              f"{100 * s['best_test_acc']:.2f}% (epoch {s['best_epoch']}). Run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    _dist.exit(main())  # sys.exit, or os._exit after a torchrun session (see distributed.exit)
