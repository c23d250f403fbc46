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
import math
import os
import sys
from datetime import datetime

from ..models import PRESETS
from ..relaxation import SCHEDULES
from . import distributed
from .checkpoint import load_checkpoint
from .config import DEFAULTS, SIGNAL_DEFAULTS, TEACHER_FILE, UsageError, parse_lrs, resolve_threads
from .data import DATASETS
from .trainer import EXIT_INTERRUPTED, train

__all__ = ["main", "make_parser", "train", "load_checkpoint", "UsageError", "DEFAULTS", "EXIT_INTERRUPTED"]

# Options that describe where/how this invocation runs, never stored as the run's config.
_FRESH = ("resume", "run_dir", "max_minutes", "no_progress", "dist_backend", "dist_timeout")
# Stored in the config, but a resumed run may change them (they do not change the maths,
# except threads, which can change float rounding: warned about).
_OVERRIDABLE = ("threads", "device", "data_dir", "download", "epochs")


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
    """Options of a data-parallel run under torchrun (ep_kernels/app/distributed.py)."""
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
        cfg = resolve_threads({k: getattr(args, k) for k in DEFAULTS})
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
        with distributed.session(cfg, run_dir, args.dist_backend, args.dist_timeout) as (cfg, run_dir):
            return train(cfg, run_dir, ckpt, max_minutes=args.max_minutes,
                         progress=not args.no_progress and distributed.is_writer(), argv=argv)
    except UsageError as e:
        parser.error(str(e))
    except FloatingPointError as e:  # divergence (NaN loss or states): a message, not a traceback
        print(f"ep-train: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    distributed.exit(main())  # sys.exit, or os._exit after a torchrun session (see distributed.exit)
