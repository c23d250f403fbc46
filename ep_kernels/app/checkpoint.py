"""The files of an ``ep-train`` run folder: atomic writes (only rank 0 writes in a
data-parallel run), the random generators' states in a form ``torch.load(weights_only=True)``
reads, loading and checking a checkpoint, the run folder's lock and the clean-up of the
temporary files a killed process left behind.
"""
import fcntl
import json
import os
import pickle
import random
import re
import socket

import numpy as np
import torch

from . import distributed
from .config import UsageError, one_line

# The keys of a checkpoint written by ep-train (format 1), and the type of each.
CHECKPOINT_KEYS = {"format": int, "config": dict, "model": dict, "optimizer": dict, "epoch": int, "batch": int,
                   "partial": dict, "history": list, "rng": dict}
LOCK_FILE = ".ep-train.lock"  # in the run folder while a run holds it (removed when the run ends)
_TEMP = re.compile(r"^(?P<name>.+)\.tmp(?P<pid>[0-9]+)$")  # temp_path()'s names


def temp_path(path):
    """The temporary file an atomic write of ``path`` goes through: ``<path>.tmp<pid>``."""
    return f"{path}.tmp{os.getpid()}"


def clean_temp_files(folder, names):
    """Remove the temporary files of atomic writes of ``names`` (``<name>.tmp<pid>``) in
    ``folder``, left by a process killed while writing; returns the names removed. Call it only
    while holding the folder's lock: no other process of ours is writing there then."""
    removed = []
    for entry in sorted(os.listdir(folder)):
        m = _TEMP.match(entry)
        path = os.path.join(folder, entry)
        if m and m.group("name") in names and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            removed.append(entry)
    return removed


def write_atomic(path, write):
    """Write through a temporary file in the same folder, then rename over ``path``: a reader
    (or a crash) sees the old file or the new one, never half of one. ``write(f)`` writes to
    the binary file ``f``. Nothing is written on a data-parallel rank other than 0."""
    if not distributed.is_writer():  # data-parallel run: only rank 0 writes the run folder
        return
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def capture_rng(gen, device):
    """Every random generator a run draws from (torch's, the data generator ``gen``, numpy's,
    Python's, the device's), as tensors, lists and numbers."""
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


def restore_rng(st, gen, device):
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(st["torch"])
    gen.set_state(st["data"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def load_checkpoint(path):
    """A checkpoint written by ``ep-train`` (plain tensors/containers: ``weights_only=True``),
    checked for the keys a run needs. UsageError, with one line that says why, for a missing,
    empty, truncated or otherwise damaged file, and for one that holds anything but tensors and
    plain containers (code, for instance), which is never loaded."""
    ckpt = _load_plain(path)
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path}: not an ep-train checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    bad = [k for k, t in CHECKPOINT_KEYS.items() if not isinstance(ckpt.get(k), t)]
    if bad:
        raise UsageError(f"{path}: not an ep-train checkpoint (missing or malformed: {', '.join(bad)})")
    if ckpt["format"] != 1:
        raise UsageError(f"{path}: checkpoint format {ckpt['format']}, this ep-train reads format 1")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise UsageError(f"{path}: not an ep-train checkpoint (its model holds something other than tensors)")
    return ckpt


def _load_plain(path):
    """``torch.load(path, weights_only=True)``, every failure as one UsageError line."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: not a file")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{path}: the file is empty (damaged: written by a process that was killed?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests loading with weights_only=False, which would run whatever
        # code the file holds: never say that. Name the object it refused, if it said.
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (it names {found.group(1)})" if found else ""
        raise UsageError(f"{path}: refused: not a file of tensors and plain containers{what}; it is damaged, "
                         "or holds other objects such as code, which ep_kernels never loads") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read it: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 -- arbitrary bytes make torch.load fail in arbitrary ways
        raise UsageError(f"{path}: cannot read it as a checkpoint (damaged or truncated?): "
                         f"{type(e).__name__}: {one_line(str(e).split('. ')[0], 160)}") from None


def file_stamp(path):
    """What changes when ``path`` is replaced or rewritten (compared after taking the lock)."""
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def check_writable_folder(path, flag):
    """UsageError unless ``path`` is a folder this process may write in, or one it may create."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "" if probe == os.path.abspath(path) else f" ({probe} is a file)"
        raise UsageError(f"{flag} {path!r} is not a folder{where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: cannot write in {probe} (permission denied)")


class RunFolderLock:
    """An exclusive lock on a run folder for a run's duration: ``fcntl.flock`` on
    ``LOCK_FILE`` in it, which names the holder (pid, host, command) for the next one.
    ``acquire()`` creates the folder and fails at once (UsageError) if another process holds
    the lock; ``release()`` removes the file and unlocks. The kernel drops the lock of a killed
    process; the file it leaves is reused."""

    def __init__(self, folder, flag, argv=()):
        self.folder, self.flag, self.argv = folder, flag, list(argv)
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd = None

    def acquire(self):
        try:
            os.makedirs(self.folder, exist_ok=True)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 4096).decode(errors="replace").split("\n")
                    os.close(fd)
                    raise UsageError(self._busy(holder)) from None
                # The holder before us may have removed the file between our open and our lock:
                # then we locked a file nobody else sees; start again on the new one.
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n{socket.gethostname()}\n{' '.join(self.argv)}\n".encode())
                self.fd = fd
        except OSError as e:
            raise UsageError(f"{self.flag} {self.folder!r}: cannot write there: {e.strerror or e}") from None
        return self

    def _busy(self, holder):
        who = "another process"
        if holder and holder[0].strip().isdigit():
            host = holder[1].strip() if len(holder) > 1 else ""
            cmd = holder[2].strip() if len(holder) > 2 else ""
            who = (f"another ep-train (pid {holder[0].strip()}{' on ' + host if host else ''}"
                   f"{', ep-train ' + cmd if cmd else ''})")
        return (f"{self.flag} {self.folder!r}: {who} is running in this run folder; wait for it to end "
                f"(or stop it) first")

    def release(self):
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.remove(self.path)  # while still locked: the next one cannot take a file being removed
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
