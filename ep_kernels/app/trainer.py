"""One ``ep-train`` run: ``Trainer`` (setup, one step, one epoch, evaluation, saving, the
endings) and ``train()``, which runs one. The command line is ``ep_kernels.app.train``.

The run folder holds ``config.json``, ``metrics.json`` (one row per epoch), ``curves.png``,
``diagnostics.png`` (EP) and ``checkpoint.pt``. The checkpoint is replaced atomically after
every epoch and whenever the run stops early (Ctrl-C, ``--max-minutes``); it holds the model,
optimizer, scheduler, every random generator's state and the position inside the epoch, so
``--resume`` continues bit for bit on the same machine (CPU, same number of threads).

Before anything is written, ``setup`` checks the whole configuration (UsageError); then the
run holds an exclusive lock on its folder (``.ep-train.lock``, rank 0 of a data-parallel run)
until it ends, so a second ep-train in the same folder stops with a one-line error, and removes
the temporary files of atomic writes that a killed run left there.

Safe points. The trainer's position (``Trainer.state``: epoch, minibatch, permutation, the
epoch's running sums, the history) changes together with the weights only inside a commit
(``optimizer.step()`` and the bookkeeping after it, or the end of an epoch), flagged by
``Trainer.committing``. After each commit ``Trainer.safe`` is a snapshot of the position and
of the random generators; live weights + that snapshot are a consistent state, which is what
is saved when the run stops.

Ctrl-C: the first one lets the current minibatch finish, saves, and exits (status 130); a
second one stops at once and saves the state at the start of the interrupted minibatch (the
weights are only written by ``optimizer.step()``, which is never interrupted half-way by the
first Ctrl-C; if a raw interrupt lands inside a commit, the last checkpoint on disk is kept).
"""
import copy
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import __version__, backend_for
from ..models import build_network
from . import distributed
from .checkpoint import (RunFolderLock, capture_rng, clean_temp_files, file_stamp, restore_rng, write_atomic,
                         write_json)
from .config import TEACHER_FILE, UsageError, attach_signals, check_beta, one_line, parse_lrs
from .data import BUNDLED, load_dataset
from .metrics import accumulate, diag_means, new_partial, plot_curves, plot_diagnostics, summary
from .teacher import prepare_teacher

EXIT_INTERRUPTED = 130
# Above this largest per-step change at the end of the free phase (epoch mean), ep-train says
# once that the phase has not converged: a change of 1e-2 in states that live in [0, 1].
UNCONVERGED = 1e-2
RUN_FILES = {"config": "config.json", "metrics": "metrics.json", "curves": "curves.png",
             "diagnostics": "diagnostics.png", "ckpt": "checkpoint.pt"}


# --- setup -----------------------------------------------------------------------------------

def make_optimizer(net, lrs, momentum, weight_decay):
    """SGD with one parameter group per state layer, then the readout (then any auxiliary heads).

    ``lrs`` is one learning rate for all groups or one per group, in that order.
    """
    groups = [(f"layers.{i}", list(layer.parameters())) for i, layer in enumerate(net.layers)]
    if net.readout is not None:
        groups.append(("readout", list(net.readout.parameters())))
    signals = getattr(net, "signals", None)  # training-only heads (docs/design.md, "How signals enter the cost and the nudges")
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


def _device(cfg):
    try:
        device = distributed.local_device(torch.device(cfg["device"]))  # cuda -> cuda:LOCAL_RANK under torchrun
    except RuntimeError as e:
        raise UsageError(f"--device {cfg['device']!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg['device']}: CUDA is not available on this machine")
    try:  # EP_KERNELS_BACKEND names a backend that exists and serves this device
        backend_for(device)
    except (ValueError, RuntimeError) as e:
        raise UsageError(one_line(e))
    return device


def _data(cfg):
    if cfg["dataset"] not in BUNDLED and cfg["data_dir"] is None:
        raise UsageError(f"--dataset {cfg['dataset']} needs --data-dir (a folder in torchvision's layout)")
    try:
        data = load_dataset(cfg["dataset"], cfg["data_dir"], cfg["download"], cfg["augment"])
        return data.limit(cfg["limit_train"], cfg["limit_test"])
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e))


def _network(cfg, data):
    try:
        return build_network(cfg["preset"], data.in_shape, data.n_classes, activation=cfg["activation"],
                             init_scale=cfg["init_scale"], width=cfg["width"], T1=cfg["T1"], T2=cfg["T2"],
                             beta=cfg["beta"], nudging=cfg["nudging"], tol=cfg["tol"],
                             # a resumed run keeps the schedule it started with, even if the preset's default changed
                             schedule=cfg.get("schedule") or cfg.get("schedule_used"))
    except (ValueError, TypeError) as e:
        raise UsageError(one_line(e))


def setup(cfg):
    """(device, data, data generator, network, optimizer, scheduler) for ``cfg``: a fresh run's
    initial state. Sets torch's thread count and seeds every random generator. Every check of
    the configuration happens here (UsageError), before anything is written."""
    if cfg["threads"] is not None:
        torch.set_num_threads(cfg["threads"])
    device = _device(cfg)
    data = _data(cfg)
    # Seed everything the run may draw from; shuffling and augmentation use their own
    # generator, so the data order does not depend on what the algorithm draws.
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"] % 2**32)
    random.seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    net = _network(cfg, data)
    if cfg["algorithm"] == "ep":  # nudged states and the EP gradient are computed in the weights' dtype
        check_beta(cfg["beta"], next(net.parameters()).dtype, cfg["batch_size"])
    cfg["schedule_used"], cfg["centred_init_scale"] = net.schedule, net.centred_init_scale
    attach_signals(cfg, net)  # before the optimizer: heads and maps are trained too
    net.to(device)
    opt = make_optimizer(net, parse_lrs(cfg["lr"]), cfg["momentum"], cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"]) if cfg["cosine"] else None
    return device, data, gen, net, opt, sched


def open_run_folder(run_dir, resumed, ckpt_stamp=None, argv=()):
    """Create ``run_dir`` and lock it for this run (``checkpoint.RunFolderLock``; on rank 0
    only in a data-parallel run, whose other ranks share rank 0's outcome), then remove the
    temporary files of atomic writes that a killed run left there. Under the lock: a fresh run
    finds no run in the folder, and a resume finds the checkpoint it read (``ckpt_stamp``, from
    ``checkpoint.file_stamp``) unchanged. Returns the lock (None on the other ranks)."""
    lock, error = None, None
    if distributed.is_writer():
        flag = "--resume" if resumed else "--run-dir"
        try:
            lock = RunFolderLock(run_dir, flag, argv).acquire()
            _check_locked_folder(run_dir, resumed, ckpt_stamp)
        except UsageError as e:
            if lock is not None:
                lock.release()
                lock = None
            error = str(e)
    ctx = distributed.current()
    if ctx is not None:
        error = ctx.broadcast_object(error)
    if error is not None:
        raise UsageError(error)
    if lock is not None:
        removed = clean_temp_files(run_dir, set(RUN_FILES.values()) | {TEACHER_FILE})
        if removed:
            print(f"ep-train: note: removed {len(removed)} temporary file{'s' if len(removed) > 1 else ''} of an "
                  f"interrupted write in {run_dir}: {', '.join(removed)}", file=sys.stderr)
    return lock


def _check_locked_folder(run_dir, resumed, ckpt_stamp):
    path = os.path.join(run_dir, RUN_FILES["ckpt"])
    if not resumed and os.path.exists(path):
        raise UsageError(f"--run-dir {run_dir!r} already holds a run: continue it with --resume "
                         f"{shlex.quote(run_dir)}, or choose another --run-dir")
    if resumed and ckpt_stamp is not None:
        try:
            same = file_stamp(path) == ckpt_stamp
        except OSError:
            same = False
        if not same:
            raise UsageError(f"--resume {run_dir!r}: {RUN_FILES['ckpt']} changed while this ep-train was starting "
                             "(another ep-train wrote it); run the command again")


# --- evaluation, stop requests ---------------------------------------------------------------

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


class StopRequest:
    """Turns the first SIGINT into a request to stop at the next safe point (``requested``);
    the second raises KeyboardInterrupt."""

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


# --- the run ---------------------------------------------------------------------------------

class Trainer:
    """One run in ``run_dir`` with config ``cfg``, from checkpoint ``ckpt`` when resuming.

    ``run()`` trains to the end (or a stop) and returns the exit status. The pieces, in the
    order of a run: ``__init__`` (setup, resume, ``config.json``, the first checkpoint),
    ``train_one_epoch`` (``train_one_step`` per minibatch), ``end_epoch`` (``evaluate``,
    ``commit_epoch``, ``save``, ``write_metrics``, ``plot``, ``report_epoch``), and one of the
    endings ``on_keyboard_interrupt`` / ``finish``.
    """

    def __init__(self, cfg, run_dir, ckpt=None, max_minutes=None, progress=True, argv=(), ckpt_stamp=None):
        self.t_start = time.monotonic()
        self.cfg, self.run_dir, self.max_minutes, self.progress = cfg, run_dir, max_minutes, progress
        # Everything is checked before the run folder is created or touched.
        self.device, self.data, self.gen, self.net, self.opt, self.sched = setup(cfg)
        self.teacher = None
        if not cfg["train_teacher"]:  # --teacher PATH (or none): read and checked now
            self.teacher = prepare_teacher(cfg, self.net, self.data, self.device, run_dir, resumed=ckpt is not None)
        self.lock = open_run_folder(run_dir, ckpt is not None, ckpt_stamp, argv)  # held until close()
        try:
            self.start(ckpt, argv)
        except BaseException:
            self.close()
            raise

    def start(self, ckpt, argv):
        """The run folder is locked: the teacher it trains, the position (from ``ckpt`` when
        resuming), ``config.json`` and a new run's first checkpoint."""
        cfg, run_dir = self.cfg, self.run_dir
        if cfg["train_teacher"]:  # trained into the run folder (a resumed run loads the one it saved)
            self.teacher = prepare_teacher(cfg, self.net, self.data, self.device, run_dir, resumed=ckpt is not None)
        self.paths = {k: os.path.join(run_dir, f) for k, f in RUN_FILES.items()}
        # Position in the run, and the running sums of the current epoch.
        self.state = {"epoch": 0, "batch": 0, "perm": None, "partial": new_partial(), "history": []}
        if ckpt is not None:
            self.load(ckpt)
        self.write_config(resumed=ckpt is not None, argv=argv)
        self.safe = self.snapshot()
        if ckpt is None:
            self.save(self.safe)  # so that an interrupt during the first epoch leaves a resumable run
        self.n_batches = math.ceil(self.data.x_train.shape[0] / cfg["batch_size"])
        self.eval_T1 = cfg["eval_T1"] or cfg["T1"]
        self.title = (f"{cfg['preset']} on {cfg['dataset']}, {cfg['algorithm']}, T1={cfg['T1']} T2={cfg['T2']} "
                      f"beta={cfg['beta']} {cfg['nudging']}, lr={cfg['lr']}")
        self.ddp = distributed.current()
        self.gradient_step = self.compute_gradients
        if self.ddp is not None:  # data-parallel: this rank's slice of the batch, gradients all-reduced
            self.gradient_step = self.ddp.wrap_step(self.compute_gradients, self.net)
        self.stop = None  # None, "interrupt" or "time"
        self.stop_request = None  # the StopRequest of run()
        self.warned_unconverged = False
        self.committing = False
        self.bar = None
        self.epoch_clock = (0.0, 0.0)  # (time.monotonic() at the start of this session's part, seconds before)

    # --- checkpoint and run folder ---

    def close(self):
        """Release the run folder (its lock); the run's files stay."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def load(self, ckpt):
        """Continue from checkpoint ``ckpt``: weights, optimizer, scheduler, position, generators.
        UsageError if they do not fit the network and optimizer built from ``config.json``."""
        cfg, path = self.cfg, self.paths["ckpt"]
        try:
            self.net.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            if self.sched is not None:
                self.sched.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise UsageError(f"{path} does not fit the network of config.json (--preset {cfg['preset']}, --width "
                             f"{cfg['width']:g}): {one_line(e, 240)}") from None
        try:
            for k in self.state:
                self.state[k] = ckpt[k]
            restore_rng(ckpt["rng"], self.gen, self.device)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise UsageError(f"{path}: damaged (its position or random generators' states): "
                             f"{type(e).__name__}: {one_line(e, 200)}") from None
        print(f"ep-train: resuming {self.run_dir} at epoch {self.state['epoch'] + 1}, minibatch "
              f"{self.state['batch']}", file=sys.stderr)

    def write_config(self, resumed, argv):
        """``config.json``: the config, every invocation of the run (a resume appends its own), the environment."""
        invocations = []
        if resumed and os.path.isfile(self.paths["config"]):  # read and checked by the command line
            with open(self.paths["config"]) as f:
                invocations = json.load(f).get("invocations", [])
            if not isinstance(invocations, list):
                invocations = []
        write_json(self.paths["config"], {
            "config": self.cfg, "invocations": invocations + [list(argv)],
            "environment": {"ep_kernels": __version__, "torch": torch.__version__,
                            "backend": backend_for(self.device), "threads": torch.get_num_threads(),
                            "python": sys.version.split()[0]}})

    def snapshot(self):
        """The position and the generators, taken only at safe points: model, optimizer and
        scheduler are not modified between one safe point and the next commit, so live
        weights + this snapshot = a consistent state."""
        st = self.state
        return {"epoch": st["epoch"], "batch": st["batch"], "perm": st["perm"],
                "partial": copy.deepcopy(st["partial"]), "history": list(st["history"]),
                "rng": capture_rng(self.gen, self.device)}

    def save(self, snap):
        """The checkpoint of snapshot ``snap`` with the live weights, written atomically."""
        ck = dict(snap, format=1, config=self.cfg, model=self.net.state_dict(), optimizer=self.opt.state_dict(),
                  scheduler=self.sched.state_dict() if self.sched is not None else None)
        write_atomic(self.paths["ckpt"], lambda f: torch.save(ck, f))

    def write_metrics(self, status):
        history = self.state["history"]
        write_json(self.paths["metrics"], dict(summary(history), status=status, epochs=history))

    def plot(self):
        plot_curves(self.paths["curves"], self.state["history"], self.title)
        plot_diagnostics(self.paths["diagnostics"], self.state["history"], self.title)

    def say(self, line):
        """Print a line on stdout, above the progress bar if there is one."""
        (tqdm.write if self.progress else print)(line)

    # --- one step, one epoch ---

    def compute_gradients(self, x, y):
        """The configured algorithm's gradient of one (slice of a) minibatch, into ``.grad``."""
        cfg = self.cfg
        if cfg["algorithm"] == "bptt":
            return self.net.bptt_backward(x, y, T1=cfg["T1"], teacher=self.teacher)
        return self.net.ep_backward(x, y, beta=cfg["beta"], T1=cfg["T1"], T2=cfg["T2"], nudging=cfg["nudging"],
                                    tol=cfg["tol"], teacher=self.teacher)

    def out_of_time(self):
        return self.max_minutes is not None and time.monotonic() - self.t_start > 60.0 * self.max_minutes

    def stop_reason(self, out_of_time):
        """None, "interrupt" or "time"; every rank of a data-parallel run agrees."""
        return distributed.stop_reason(self.stop_request.requested, out_of_time)

    def minibatch(self, k):
        """Minibatch ``k`` of this epoch's permutation, augmented, on the device."""
        data, bs = self.data, self.cfg["batch_size"]
        idx = self.state["perm"][k * bs:(k + 1) * bs]
        x, y = data.x_train[idx], data.y_train[idx]
        if data.augment is not None:
            x = data.augment(x, self.gen)
        return x.to(self.device), y.to(self.device)

    def train_one_step(self):
        """One optimizer step on the next minibatch, committed, then a new safe point."""
        k = self.state["batch"]
        x, y = self.minibatch(k)
        self.opt.zero_grad(set_to_none=True)
        res = self.gradient_step(x, y)
        if not math.isfinite(float(res.loss)):
            raise FloatingPointError(
                f"training diverged at epoch {self.state['epoch'] + 1}, minibatch {k}: the loss is "
                f"{float(res.loss)}; try a smaller --lr or --beta (the last good checkpoint is in the run folder)")
        t0, sec0 = self.epoch_clock
        partial = self.state["partial"]
        self.committing = True
        self.opt.step()
        accumulate(partial, res, y)
        self.state["batch"] = k + 1
        partial["seconds"] = sec0 + time.monotonic() - t0
        self.committing = False
        self.safe = self.snapshot()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{partial['loss_sum'] / partial['count']:.3f}",
                             acc=f"{100 * partial['correct'] / partial['count']:.1f}%")

    def train_one_epoch(self):
        """The rest of the current epoch's minibatches; sets ``stop`` if asked to stop after one."""
        if self.state["perm"] is None:
            self.state["perm"] = torch.randperm(self.data.x_train.shape[0], generator=self.gen)
        self.net.train()
        self.epoch_clock = (time.monotonic(), self.state["partial"]["seconds"])
        self.bar = tqdm(total=self.n_batches, initial=self.state["batch"],
                        desc=f"epoch {self.state['epoch'] + 1}/{self.cfg['epochs']}", disable=not self.progress,
                        leave=False, dynamic_ncols=True)
        while self.state["batch"] < self.n_batches:
            self.train_one_step()
            self.stop = self.stop_reason(self.out_of_time())  # all ranks agree
            if self.stop is not None:
                break
        self.bar.close()

    # --- end of an epoch ---

    def evaluate(self):
        """(test loss, test accuracy); each rank of a data-parallel run evaluates its slice."""
        data = self.data
        if self.ddp is not None:
            return self.ddp.evaluate(evaluate, self.net, data.x_test, data.y_test, self.eval_T1, self.device)
        return evaluate(self.net, data.x_test, data.y_test, self.eval_T1, self.device)

    def commit_epoch(self, row):
        """Record the epoch's row, step the schedule, move to the next epoch; a new safe point."""
        self.committing = True
        self.state["history"].append(row)
        if self.sched is not None:
            self.sched.step()
        self.state.update(epoch=self.state["epoch"] + 1, batch=0, perm=None, partial=new_partial())
        self.committing = False
        self.safe = self.snapshot()

    def end_epoch(self):
        """Evaluate, record, step the schedule, save the checkpoint, metrics and plots, report."""
        e = self.state["epoch"]
        t1 = time.monotonic()
        test_loss, test_acc = self.evaluate()
        p = self.state["partial"]
        row = {"epoch": e + 1, "train_loss": p["loss_sum"] / p["count"], "train_acc": p["correct"] / p["count"],
               "test_loss": test_loss, "test_acc": test_acc, "lr": [g["lr"] for g in self.opt.param_groups],
               "train_seconds": p["seconds"], "seconds": p["seconds"] + time.monotonic() - t1,
               "diagnostics": diag_means(p)}
        self.commit_epoch(row)
        self.save(self.safe)
        self.write_metrics("running")
        self.plot()
        self.report_epoch(row)
        self.stop = self.stop_reason(self.out_of_time() and self.state["epoch"] < self.cfg["epochs"])

    def report_epoch(self, row):
        """The epoch's line, and once per session the note about an unconverged free phase."""
        cfg = self.cfg
        line = (f"epoch {row['epoch']}/{cfg['epochs']}  train loss {row['train_loss']:.4f} acc "
                f"{100 * row['train_acc']:.2f}%  test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%  "
                f"lr {row['lr'][0]:.4g}  {row['seconds']:.1f}s")
        diag = row["diagnostics"]
        free_res = diag.get("free.residual")
        if free_res:
            line += f"  free residual {max(free_res):.1e}"
        if cfg.get("tol") is not None and "free.steps" in diag and "nudged.steps" in diag:
            line += f"  steps {diag['free.steps']:.0f}/{diag['nudged.steps']:.0f}"
        self.say(line)
        if free_res and max(free_res) > UNCONVERGED and not self.warned_unconverged:
            self.warned_unconverged = True
            self.say(f"ep-train: note: the free phase ends short of a fixed point (largest change in its last "
                     f"step {max(free_res):.2g}, epoch mean; T1={cfg['T1']}, {self.net.schedule} schedule), so EP's "
                     "gradient departs from BPTT's; `ep-gradcheck --checkpoint RUN_DIR` measures by how much. "
                     "More --T1 brings it closer, and --schedule alternating converges where synchronous "
                     "updates oscillate.")

    # --- the run and its endings ---

    def run(self):
        """Train until the last epoch or a stop; returns 0 when done or stopped by
        ``max_minutes``, ``EXIT_INTERRUPTED`` after Ctrl-C."""
        try:
            with StopRequest() as self.stop_request:
                while self.state["epoch"] < self.cfg["epochs"] and self.stop is None:
                    self.train_one_epoch()
                    if self.stop is not None:
                        break
                    self.end_epoch()
        except KeyboardInterrupt:
            self.on_keyboard_interrupt()
        elapsed = time.monotonic() - self.t_start
        if self.stop is not None:
            return self.finish_stopped()
        return self.finish(elapsed)

    def on_keyboard_interrupt(self):
        """A raw KeyboardInterrupt (second Ctrl-C, or Ctrl-C outside the main thread)."""
        if self.bar is not None:
            self.bar.close()
        self.stop = "interrupt"
        if self.committing:
            # Cut inside optimizer.step() or the bookkeeping after it: the live state is not
            # consistent; the checkpoint on disk (the last safe point saved) stands.
            print("ep-train: interrupted while updating the weights; keeping the last saved checkpoint",
                  file=sys.stderr)
            self.safe = None

    def finish_stopped(self):
        """The interrupt and out-of-time endings: save the last safe point, say how to resume."""
        safe = self.safe
        if safe is not None:
            self.save(safe)
            where = (f"after epoch {safe['epoch']}" if safe["batch"] == 0 else
                     f"in epoch {safe['epoch'] + 1} after minibatch {safe['batch']} of {self.n_batches}")
        else:
            where = "at its last save"
        interrupted = self.stop == "interrupt"
        self.write_metrics("interrupted" if interrupted else "stopped (--max-minutes)")
        why = "interrupted" if interrupted else f"stopped after the --max-minutes {self.max_minutes:g} budget"
        print(f"ep-train: {why}; checkpoint saved {where} in {self.run_dir}.\n"
              f"Resume with:  ep-train --resume {shlex.quote(self.run_dir)}", file=sys.stderr)
        s = summary(self.state["history"])
        if s["epochs_done"]:
            n = s["epochs_done"]
            print(f"ep-train: so far {n} epoch{'s' if n != 1 else ''}: final test accuracy "
                  f"{100 * s['final_test_acc']:.2f}%, best {100 * s['best_test_acc']:.2f}% (epoch {s['best_epoch']})")
        return EXIT_INTERRUPTED if interrupted else 0

    def finish(self, elapsed):
        """The done ending: final metrics and the summary line."""
        cfg = self.cfg
        self.write_metrics("done")
        s = summary(self.state["history"])
        if s["epochs_done"]:
            print(f"ep-train: done, {s['epochs_done']} epochs ({cfg['algorithm']}, {cfg['preset']} on "
                  f"{cfg['dataset']}) in {elapsed / 60:.1f} min this session: final test accuracy "
                  f"{100 * s['final_test_acc']:.2f}%, best {100 * s['best_test_acc']:.2f}% (epoch "
                  f"{s['best_epoch']}). Run folder: {self.run_dir}")
        return 0


def train(cfg, run_dir, ckpt=None, max_minutes=None, progress=True, argv=(), ckpt_stamp=None):
    """Train with config ``cfg`` in ``run_dir``; from checkpoint ``ckpt`` when resuming
    (``ckpt_stamp``: ``checkpoint.file_stamp`` of the file it was read from, checked under the
    run folder's lock). The run folder is locked for the run's duration.

    Returns 0 when done or stopped by ``max_minutes``, ``EXIT_INTERRUPTED`` after Ctrl-C.
    """
    threads = torch.get_num_threads()
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, ckpt, max_minutes, progress, argv, ckpt_stamp)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        torch.set_num_threads(threads)  # --threads is for this run, not for the caller's process
