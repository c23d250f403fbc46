"""``ep-train``: train an EP network (or the same network by BPTT) and keep a run folder.

    ep-train                                   # the default: small ConvNet on the bundled digits
    ep-train --preset vgg5 --dataset cifar10 --data-dir ~/data --epochs 100 --T1 250 --T2 25
    ep-train --resume runs/<name>              # continue a stopped run exactly where it stopped
    python -m ep_kernels.app.train ...         # the same; under torchrun: torchrun ... -m ep_kernels.app.train

This module is the command line: the options, the checks of a resume, ``main``. The run itself
(run folder, checkpoints, exact resume, Ctrl-C, ``--max-minutes``) is ``ep_kernels.app.trainer``;
the configuration's defaults and checks are ``ep_kernels.app.config``.
"""
import argparse
import json
import os
import shlex
import sys
from datetime import datetime

from ..models import PRESETS
from ..relaxation import SCHEDULES
from . import distributed
from .checkpoint import check_writable_folder, file_stamp, load_checkpoint
from .config import (DEFAULTS, SIGNAL_DEFAULTS, TEACHER_FILE, UsageError, number, one_line, parse_lrs,
                     resolve_threads)
from .data import DATASETS
from .trainer import EXIT_INTERRUPTED, train

__all__ = ["main", "make_parser", "train", "load_checkpoint", "UsageError", "DEFAULTS", "EXIT_INTERRUPTED"]

# Options that describe where/how this invocation runs, never stored as the run's config.
_FRESH = ("resume", "run_dir", "max_minutes", "no_progress", "dist_backend", "dist_timeout")
# Stored in the config, but a resumed run may change them (they do not change the maths,
# except threads, which can change float rounding: warned about).
_OVERRIDABLE = ("threads", "device", "data_dir", "download", "epochs")


# --- command line ------------------------------------------------------------------------

def _lr_arg(text):
    parse_lrs(text)  # validate; keep the text (it goes to config.json as given)
    return text.replace(" ", "")


def _tol_arg(text):
    if text.strip().lower() == "none":
        return None
    return number(float, 0, strict=True)(text)


def make_parser():
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="ep-train", allow_abbrev=False,
        description="Train an Equilibrium Propagation network (or the same network by BPTT).",
        epilog="Example: ep-train --preset vgg5 --dataset cifar10 --data-dir ~/data --epochs 100 --T1 250 --T2 25")
    g = p.add_argument_group("network")
    g.add_argument("--preset", choices=PRESETS, default=d["preset"], help="network (default: %(default)s)")
    g.add_argument("--width", type=number(float, 0, strict=True), default=d["width"],
                   help="multiply the preset's channel/unit counts (default: %(default)s)")
    g.add_argument("--activation", choices=("hardsigmoid", "hardsigmoid_half"), default=d["activation"],
                   help="clamp(x, 0, 1) or clamp(x/2, 0, 1) (default: %(default)s)")
    g.add_argument("--init-scale", type=number(float, 0, strict=True), default=d["init_scale"],
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
    g.add_argument("--limit-train", type=number(int, 1), default=None, metavar="N",
                   help="use only the first N training examples (quick runs, tests)")
    g.add_argument("--limit-test", type=number(int, 1), default=None, metavar="N",
                   help="use only the first N test examples")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algorithm", choices=("ep", "bptt"), default=d["algorithm"],
                   help="EP gradient estimate, or backprop through the T1 free steps (default: %(default)s)")
    g.add_argument("--T1", type=number(int, 1), default=d["T1"],
                   help="free-phase steps at most (default: %(default)s)")
    g.add_argument("--T2", type=number(int, 1), default=d["T2"],
                   help="nudged-phase steps at most (default: %(default)s)")
    g.add_argument("--beta", type=number(float, 0, strict=True), default=d["beta"],
                   help="nudging strength (default: %(default)s)")
    g.add_argument("--nudging", choices=("symmetric", "one-sided", "random-sign"), default=d["nudging"],
                   help="default: %(default)s")
    g.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"],
                   help="relaxation step: all layers from the same old states, or odd-numbered layers then "
                        "even-numbered ones (converges where synchronous updates oscillate) (default: "
                        "alternating for the deep presets vgg11/13/16 and deep8, synchronous otherwise)")
    g.add_argument("--eval-T1", type=number(int, 1), default=None,
                   help="free-phase steps at evaluation (default: --T1)")
    g.add_argument("--tol", type=_tol_arg, default=d["tol"],
                   help="a phase stops at the first step where every layer's max change is below this, T1 / T2 "
                        "being caps; each epoch's line shows the mean steps taken; 'none': always T1 / T2 steps "
                        "(default: %(default)s)")
    g = p.add_argument_group("optimisation (SGD)")
    g.add_argument("--epochs", type=number(int, 1), default=d["epochs"], help="default: %(default)s")
    g.add_argument("--batch-size", type=number(int, 1), default=d["batch_size"], help="default: %(default)s")
    g.add_argument("--lr", type=_lr_arg, default=d["lr"],
                   help="learning rate, or one per layer then the readout, comma-separated "
                        "(e.g. 0.2,0.1,0.05) (default: %(default)s)")
    g.add_argument("--momentum", type=number(float, 0), default=d["momentum"], help="default: %(default)s")
    g.add_argument("--weight-decay", type=number(float, 0), default=d["weight_decay"], help="default: %(default)s")
    g.add_argument("--cosine", action=argparse.BooleanOptionalAction, default=d["cosine"],
                   help="cosine learning-rate schedule over the epochs (default: on)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=number(int, 0), default=d["seed"], help="default: %(default)s")
    g.add_argument("--threads", type=number(int, 1), default=None,
                   help="torch CPU threads (default: 1 for the small presets 'small' and 'mlp', whose tiny "
                        "ops gain little from threads and slow down badly when other processes share the "
                        "cores; torch's default otherwise). Recorded in config.json, so a resume uses the same")
    g.add_argument("--device", default=d["device"], help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    g.add_argument("--run-dir", default=None,
                   help="run folder (default: runs/<date-time>-<preset>-<dataset>-<algorithm>)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR with its own config (--epochs may extend it)")
    g.add_argument("--max-minutes", type=number(float, 0, strict=True), default=None,
                   help="stop cleanly (saving) after this much wall-clock time; resume later")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    _add_signal_options(p)
    _add_distributed_options(p)
    return p


def _add_distributed_options(p):
    """Options of a data-parallel run under torchrun (ep_kernels/app/distributed.py)."""
    g = p.add_argument_group("several processes (under torchrun; ignored otherwise)")
    g.add_argument("--dist-backend", choices=("gloo", "nccl"), default=None,
                   help="torch.distributed backend (default: nccl for --device cuda, gloo on CPU)")
    g.add_argument("--dist-timeout", type=number(float, 0, strict=True), default=None, metavar="SECONDS",
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


# --- intermediate signals and distillation (docs/design.md, "Intermediate error signals") ------------------------------

def _add_signal_options(p):
    d = SIGNAL_DEFAULTS
    g = p.add_argument_group("intermediate signals and distillation (docs/design.md, 'Intermediate error signals')")
    g.add_argument("--signals", default=d["signals"],
                   help="extra cost terms: classifier (local classifier heads), feature (feature distillation "
                        "to a teacher through 1x1 maps), logit (KD at the readout), comma-separated, or none "
                        "(default: %(default)s)")
    g.add_argument("--signal-layers", default=d["signal_layers"],
                   help="where classifier/feature signals attach: auto (the end of every block but the top "
                        "layer) or comma-separated layer indices (default: %(default)s)")
    g.add_argument("--lambda", dest="lambdas", default=d["lambdas"],
                   help="signal weight: one value, or one per --signals kind in that order (default: %(default)s)")
    g.add_argument("--tau", type=number(float, 0, strict=True), default=d["tau"],
                   help="logit distillation temperature (default: %(default)s)")
    g.add_argument("--signal-pool", type=number(int, 1), default=d["signal_pool"],
                   help="local classifier heads read the state average-pooled to this size (default: %(default)s)")
    g.add_argument("--teacher", default=d["teacher"], metavar="PATH",
                   help="a saved teacher (ep_kernels.teacher.save_teacher) for feature/logit distillation")
    g.add_argument("--train-teacher", action="store_true",
                   help=f"first train the feed-forward teacher by backprop (--teacher-epochs), save it as "
                        f"{TEACHER_FILE} in the run folder, then use it")
    g.add_argument("--teacher-epochs", type=number(int, 1), default=d["teacher_epochs"],
                   help="default: %(default)s")
    g.add_argument("--teacher-lr", type=number(float, 0, strict=True), default=d["teacher_lr"],
                   help="teacher SGD learning rate (default: %(default)s)")


def _default_run_dir(cfg):
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{stamp}-{cfg['preset']}-{cfg['dataset']}-{cfg['algorithm']}")
    path, i = base, 1
    while os.path.exists(path):
        i += 1
        path = f"{base}-{i}"
    return path


def _resolve(parser, argv):
    """(config, run folder, checkpoint or None, its file stamp or None) from the command line;
    checks a resume's folder, files and options. UsageError on any bad input."""
    args = parser.parse_args(argv)
    given = _explicit_options(parser, argv)
    if args.resume is None:
        cfg = resolve_threads({k: getattr(args, k) for k in DEFAULTS})
        run_dir = args.run_dir or _default_run_dir(cfg)
        check_writable_folder(run_dir, "--run-dir")
        if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
            raise UsageError(f"--run-dir {run_dir!r} already holds a run: continue it with --resume "
                             f"{shlex.quote(run_dir)}, or choose another --run-dir")
        return cfg, run_dir, None, None

    run_dir = args.resume
    if args.run_dir is not None and os.path.abspath(args.run_dir) != os.path.abspath(run_dir):
        raise UsageError("--resume continues in its own folder; do not also give a different --run-dir")
    cfg_path, ckpt_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "checkpoint.pt")
    for path in (cfg_path, ckpt_path):
        if not os.path.isfile(path):
            raise UsageError(f"--resume {run_dir!r}: no {os.path.basename(path)} there (not an ep-train run folder)")
    stored = _read_config(parser, cfg_path)
    cfg = dict(stored)
    for k in DEFAULTS:  # a config from an older version may lack newer options
        cfg.setdefault(k, DEFAULTS[k])
    _apply_overrides(args, given, cfg)
    stamp = file_stamp(ckpt_path)  # before reading: the trainer checks, under the lock, that it did not change
    ckpt = load_checkpoint(ckpt_path)
    _check_same_run(stored, ckpt["config"], run_dir)
    return cfg, run_dir, ckpt, stamp


def _read_config(parser, path):
    """The ``"config"`` object of a run's ``config.json``, every stored option checked as the
    command line checks it."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read it: {one_line(e)}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON (damaged?): {e.msg} at line {e.lineno} column {e.colno}"
                         ) from None
    cfg = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict):
        raise UsageError(f'{path}: no "config" object (damaged, or not written by ep-train)')
    actions = {a.dest: a for a in parser._actions}
    for k in DEFAULTS:
        if k in cfg:
            problem = _stored_value_problem(actions[k], cfg[k])
            if problem:
                raise UsageError(f'{path}: "{k}" (--{k.replace("_", "-")}): {problem} (damaged or edited?)')
    return cfg


def _stored_value_problem(action, v):
    """Why ``v`` is not a value ``action`` (an ep-train option) could have stored, or None."""
    if v is None:
        return None if action.default is None else "null is not a value of this option"
    if action.nargs == 0:  # store_true, --x/--no-x
        return None if isinstance(v, bool) else f"expected true or false, got {v!r}"
    if isinstance(v, (bool, dict, list)):
        return f"got {json.dumps(v)}"
    if action.choices is not None:
        return None if v in action.choices else f"got {v!r}, not one of {', '.join(map(str, action.choices))}"
    if action.type is None:
        return None if isinstance(v, str) else f"expected a string, got {v!r}"
    try:
        action.type(str(v))
    except (argparse.ArgumentTypeError, ValueError) as e:
        return str(e)
    return None


def _apply_overrides(args, given, cfg):
    """The options given with ``--resume``: those a resumed run may change go into ``cfg``,
    others must equal the run's."""
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


def _check_same_run(stored, ckpt_cfg, run_dir):
    """config.json and the checkpoint's own copy of the config define the same network and run
    (the options a resume may change apart): else the checkpoint is another run's."""
    keys = [k for k in list(DEFAULTS) + ["schedule_used"]
            if k not in _OVERRIDABLE and k in stored and k in ckpt_cfg]
    differ = [f"{k}: {ckpt_cfg[k]!r} in checkpoint.pt, {stored[k]!r} in config.json" for k in keys
              if ckpt_cfg[k] != stored[k]]
    if differ:
        raise UsageError(f"--resume {run_dir!r}: checkpoint.pt and config.json disagree ({'; '.join(differ)}): "
                         "the checkpoint is another run's, or config.json was edited")


def _error(parser, message, status=2):
    """``<prog>: error: <message>`` on one line of stderr, and the exit status (argparse's convention)."""
    parser.exit(status, f"{parser.prog}: error: {one_line(message, 2000)}\n")


def main(argv=None):
    """Entry point of ``ep-train``; returns the exit status (0, or 130 when interrupted, or 1
    when training diverged); raises SystemExit(2) on a bad option or input file."""
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, run_dir, ckpt, stamp = _resolve(parser, argv)
        args = parser.parse_args(argv)
        with distributed.session(cfg, run_dir, args.dist_backend, args.dist_timeout) as (cfg, run_dir):
            return train(cfg, run_dir, ckpt, max_minutes=args.max_minutes,
                         progress=not args.no_progress and distributed.is_writer(), argv=argv, ckpt_stamp=stamp)
    except UsageError as e:
        _error(parser, str(e))
    except FloatingPointError as e:  # divergence (NaN loss or states): a message, not a traceback
        print(f"ep-train: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    distributed.exit(main())  # sys.exit, or os._exit after a torchrun session (see distributed.exit)
