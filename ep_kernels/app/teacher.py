"""Training the feed-forward teacher of the distillation signals by backprop, and the teacher
of an ``ep-train`` run (``--teacher PATH`` or ``--train-teacher``).

The teacher itself (``Teacher``, ``Teacher.like``, ``save_teacher``, ``load_teacher``) is in
the library, ``ep_kernels.teacher``.
"""
import os
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from ..teacher import Teacher, load_teacher, save_teacher
from .checkpoint import temp_path
from .config import TEACHER_FILE, UsageError


def train_teacher(teacher, data, epochs=10, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64, seed=0,
                  progress=True, log=print):
    """Backprop training of ``teacher`` on ``data`` (an ``ep_kernels.app.data.Dataset``).
    Returns the per-epoch test accuracies."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(teacher.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    n = len(data.y_train)
    accs = []
    for epoch in range(epochs):
        teacher.train()
        perm = torch.randperm(n, generator=g)
        bar = tqdm(range(0, n, batch_size), desc=f"teacher epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        for i in bar:
            idx = perm[i:i + batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            if data.augment is not None:
                x = data.augment(x, g)
            loss = F.cross_entropy(teacher(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        sched.step()
        accs.append(evaluate(teacher, data.x_test, data.y_test, batch_size))
        log(f"teacher epoch {epoch + 1}/{epochs}: test accuracy {100 * accs[-1]:.2f}%")
    return accs


@torch.no_grad()
def evaluate(teacher, x, y, batch_size=256):
    """The teacher's test accuracy on ``x``, ``y``."""
    teacher.eval()
    correct = sum((teacher(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(y), batch_size))
    return correct / max(1, len(y))


def _train_run_teacher(cfg, net, data, device, path):
    """Train the teacher of ``--train-teacher`` (random state untouched) and save it at
    ``path`` (rank 0 only); returns it frozen, on ``device``."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        teacher = Teacher.like(net, seed=cfg["seed"]).to(device)
        accs = train_teacher(teacher, data, epochs=cfg["teacher_epochs"], lr=cfg["teacher_lr"],
                             seed=cfg["seed"], progress=False,
                             log=lambda m: print(f"ep-train: {m}", file=sys.stderr))
    # Every rank trains the same teacher (same seed, same data); only rank 0 writes it,
    # atomically, and every rank keeps its own copy in memory (no read-after-write race).
    trained = teacher.cpu()
    if distributed.is_writer():
        tmp = temp_path(path)  # the pattern a later run's clean-up knows (checkpoint.clean_temp_files)
        try:
            save_teacher(trained, tmp, meta={"preset": cfg["preset"], "width": cfg["width"],
                                             "dataset": cfg["dataset"], "epochs": cfg["teacher_epochs"],
                                             "lr": cfg["teacher_lr"], "test_acc": accs})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    trained.eval()
    for p in trained.parameters():
        p.requires_grad_(False)
    return trained.to(device)


def prepare_teacher(cfg, net, data, device, run_dir, resumed):
    """The teacher for distillation (None without distillation signals): loaded from
    ``--teacher``, or trained by backprop into the run folder (``--train-teacher``; a resumed
    run loads the one it saved). Teacher training does not touch the run's random state.
    Records ``teacher_file`` and ``teacher_test_acc`` in ``cfg``."""
    if not any(s.kind in ("feature", "logit") for s in net.signals):
        return None
    teacher = None
    if cfg["train_teacher"]:
        path = os.path.join(run_dir, TEACHER_FILE)
        if not os.path.isfile(path):
            if resumed:
                print(f"ep-train: note: {path} is missing; training the teacher again", file=sys.stderr)
            teacher = _train_run_teacher(cfg, net, data, device, path)
    else:
        path = cfg["teacher"]
    try:
        if teacher is None:  # not trained in this process: load it (weights_only)
            teacher = load_teacher(path, net).to(device)
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise UsageError(f"teacher {path!r}: {e}")
    cfg["teacher_file"] = os.path.abspath(path)
    if "teacher_test_acc" not in cfg:
        cfg["teacher_test_acc"] = evaluate(teacher, data.x_test.to(device), data.y_test.to(device))
        print(f"ep-train: teacher {path}: test accuracy {100 * cfg['teacher_test_acc']:.2f}%", file=sys.stderr)
    return teacher
