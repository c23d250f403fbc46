"""The configuration of an ``ep-train`` run: its defaults, the checks a config dict gets, and
the intermediate signals it asks for. Shared by the command line (``train``), the trainer and
``ep-gradcheck --checkpoint`` (which rebuilds a run's signals from its stored config).

A config is a plain dict (one key per ``ep-train`` option, stored in ``config.json`` and in the
checkpoint); what was actually attached is recorded in it too (``signals_used``,
``teacher_file``, ``schedule_used``).
"""
import argparse
import math
import os
import warnings

import torch

from ..models import build_signals, parse_signal_kinds, parse_signal_layers
from ..network import check_beta as library_check_beta

# The defaults are the tuned configuration of the default run (small ConvNet, bundled digits,
# shift augmentation, 1 thread). Measured on a 2-core CPU: 2.2 min, 98.9% test accuracy (EP);
# --algorithm bptt 2.5 min, 98.3%. With 30 epochs the EP-BPTT gap reached 1.7 points for
# one seed; with 50 it stayed below 1 point over seeds 0-3. Change them only with new measurements.
DEFAULTS = dict(
    preset="small", width=1.0, activation="hardsigmoid_half", init_scale=None,
    dataset="digits", data_dir=None, download=False, augment=None, limit_train=None, limit_test=None,
    algorithm="ep", T1=30, T2=10, beta=0.5, nudging="symmetric", eval_T1=None, tol=1e-4, schedule=None,
    epochs=50, batch_size=32, lr="0.05", momentum=0.9, weight_decay=0.0, cosine=True,
    seed=0, threads=None, device="cpu",
)

# Intermediate signals and distillation (docs/design.md, "Intermediate error signals"). Every choice is an option stored
# in config.json (the paper's method is not fully public).
SIGNAL_DEFAULTS = dict(
    signals="none", signal_layers="auto", lambdas="1.0", tau=4.0, signal_pool=1,
    teacher=None, train_teacher=False, teacher_epochs=10, teacher_lr=0.05,
)
DEFAULTS.update(SIGNAL_DEFAULTS)  # stored in the run's config like every other option
TEACHER_FILE = "teacher.pt"  # where --train-teacher saves the teacher, in the run folder


class UsageError(ValueError):
    """A bad option, option combination or input file; the command lines report it as one
    line, ``<prog>: error: <message>``, with exit status 2 (argparse's convention)."""


def one_line(text, limit=600):
    """``text`` on one line (newlines and runs of spaces folded), cut after ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def number(kind, lo=None, strict=False):
    """An argparse ``type``: ``kind`` (int or float) from text, finite, ``>= lo`` (``> lo``
    when ``strict``)."""
    def parse(text):
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


def check_beta(beta, dtype, batch, flag="--beta"):
    """UsageError unless the library accepts ``beta`` for a network computing in ``dtype`` on
    batches of 1 to ``batch`` examples (``ep_kernels.network.check_beta``: beta and
    1/(2 beta N) must be normal numbers of the dtype). Its warning about a beta close to the
    dtype's epsilon is left to the first ``ep_backward``, so it is shown once."""
    for n in sorted({1, batch}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                library_check_beta(beta, dtype, n)
            except (ValueError, TypeError) as e:
                raise UsageError(f"{flag} {beta:g}: {one_line(e)}") from None


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


def resolve_threads(cfg):
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


def check_signal_options(cfg):
    """Parsed signal kinds, layers and weights of ``cfg``; UsageError on bad combinations."""
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


def attach_signals(cfg, net):
    """Attach the signals ``cfg`` asks for to ``net`` (before the optimizer is built, so their
    heads and maps get their own parameter group) and record what was attached in
    ``cfg["signals_used"]``. UsageError on a bad configuration."""
    kinds, layers, lambdas = check_signal_options(cfg)
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
