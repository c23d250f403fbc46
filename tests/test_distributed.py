"""Data-parallel ep-train under torchrun (CPU, gloo): 2 processes = 1 process, resume on another
number of processes, a dying rank.

Tolerance. N processes compute the same batch-mean EP gradient as one, but summed in another
order: sum_r (n_r / B) * mean_{i in shard r} g_i instead of mean_{i in batch} g_i. That is a
float32 rounding difference of a few ulps per step, carried through the momentum and the next
relaxations. Measured on this configuration (8 SGD steps, weights of magnitude ~0.1): the
largest weight difference is 4.5e-8 (relative to the largest weight: 3.5e-7). We allow
atol 1e-6 + rtol 1e-5, about 20x the measured difference; a wrong shard weighting, a
different permutation, augmentation or nudging sign gives differences of 1e-3 and more.
"""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from ep_kernels.app import train

# 76 examples in batches of 25: 25, 25, 25, 1 -> slices of 13/12 (uneven) and 1/0 (an empty
# slice: that rank relaxes a dummy with weight 0); random-sign nudging checks that every rank
# draws the same sign; the digits' default shift augmentation that every rank augments alike.
TINY = ["--preset", "mlp", "--limit-train", "76", "--limit-test", "40", "--batch-size", "25", "--T1", "5",
        "--T2", "3", "--threads", "1", "--no-progress", "--lr", "0.05", "--epochs", "2", "--nudging", "random-sign"]
ATOL, RTOL = 1e-6, 1e-5
TIMEOUT = 150  # seconds for one torchrun launch (a few seconds when the machine is idle)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, args, env=None, timeout=TIMEOUT):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "--monitor_interval=0.2", "-m", "ep_kernels.app.train"] + list(args)
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


def ckpt(rd):
    return train.load_checkpoint(os.path.join(rd, "checkpoint.pt"))  # weights_only=True


def assert_close_runs(rd_a, rd_b):
    a, b = ckpt(rd_a), ckpt(rd_b)
    assert (a["epoch"], a["batch"]) == (b["epoch"], b["batch"])
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=ATOL, rtol=RTOL, msg=k)
    for k, st in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][k]["momentum_buffer"], st["momentum_buffer"],
                                   atol=ATOL, rtol=RTOL)
    # the same data order, augmentation and nudging signs: the generators are in the same state
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and torch.equal(a["rng"]["data"], b["rng"]["data"])
    assert len(a["history"]) == len(b["history"])
    for ra, rb in zip(a["history"], b["history"]):
        for k in ("train_loss", "test_loss"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5), k
        for k in ("train_acc", "test_acc"):
            assert rb[k] == pytest.approx(ra[k], abs=0.03), k  # a near-tie logit may flip
        assert rb["lr"] == ra["lr"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run (no torchrun: the trainer as it always was)."""
    rd = str(tmp_path_factory.mktemp("ref") / "run")
    assert train.main(TINY + ["--run-dir", rd]) == 0
    return rd


def test_two_processes_equal_one(reference, tmp_path):
    rd = str(tmp_path / "two")
    # tiny buckets: every parameter in its own bucket, several async all-reduces in flight
    rc, out, _ = torchrun(2, TINY + ["--run-dir", rd], env={"EP_KERNELS_BUCKET_MB": "0.01"})
    assert rc == 0, out
    assert out.count("epoch 2/2") == 1  # rank 0 alone reports
    assert sorted(os.listdir(rd)) == sorted(os.listdir(reference))  # and writes the same run folder
    assert_close_runs(reference, rd)


def test_stop_mid_epoch_resume_on_other_world_size(reference, tmp_path):
    # 2 processes stop after the first minibatch (--max-minutes: every rank agrees on when) ...
    rd = str(tmp_path / "a")
    rc, out, _ = torchrun(2, TINY + ["--run-dir", rd, "--max-minutes", "1e-6"])
    assert rc == 0, out
    c = ckpt(rd)
    assert (c["epoch"], c["batch"]) == (0, 1)
    # ... and 1 process finishes the run
    assert train.main(["--resume", rd, "--no-progress"]) == 0
    assert_close_runs(reference, rd)

    # the other way round: 1 process stops mid-epoch, 2 processes finish
    rd = str(tmp_path / "b")
    assert train.main(TINY + ["--run-dir", rd, "--max-minutes", "1e-6"]) == 0
    assert (ckpt(rd)["epoch"], ckpt(rd)["batch"]) == (0, 1)
    rc, out, _ = torchrun(2, ["--resume", rd, "--no-progress"])
    assert rc == 0, out
    assert_close_runs(reference, rd)


def test_dying_rank_stops_the_job_and_the_run_resumes(reference, tmp_path):
    rd = str(tmp_path / "run")
    # rank 1 raises at its 6th step (epoch 2, minibatch 2): torchrun must end, non-zero, promptly
    rc, out, seconds = torchrun(2, TINY + ["--run-dir", rd, "--dist-timeout", "30"],
                                env={"EP_KERNELS_FAIL_AT_STEP": "6"}, timeout=120)
    assert rc != 0, out
    assert "fails on purpose" in out
    assert seconds < 100, f"torchrun took {seconds:.0f} s to give up"
    c = ckpt(rd)
    assert (c["epoch"], c["batch"]) == (1, 0)  # the last checkpoint: the end of epoch 1
    rc, out, _ = torchrun(2, ["--resume", rd, "--no-progress"])
    assert rc == 0, out
    assert_close_runs(reference, rd)


def test_shard_bounds():
    from ep_kernels.app.distributed import shard_bounds
    for n in (0, 1, 5, 25, 76):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
