"""The files of an ``ep-train`` run folder: atomic writes (only rank 0 writes in a
data-parallel run), the random generators' states in a form ``torch.load(weights_only=True)``
reads, and loading a checkpoint.
"""
import json
import os
import random

import numpy as np
import torch

from . import distributed


def write_atomic(path, write):
    """Write through a temporary file in the same folder, then rename over ``path``: a reader
    (or a crash) sees the old file or the new one, never half of one. ``write(f)`` writes to
    the binary file ``f``. Nothing is written on a data-parallel rank other than 0."""
    if not distributed.is_writer():  # data-parallel run: only rank 0 writes the run folder
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
    """A checkpoint written by ``ep-train`` (plain tensors/containers: ``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)
