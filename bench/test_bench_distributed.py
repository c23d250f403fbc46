"""Data-parallel EP (issue 5): time per optimizer step on 1 and 2 processes (torchrun, gloo,
1 thread a process) and the gradient all-reduce against the relaxation (one ``ep_backward``),
for a small and a larger network, so the reader sees how communication compares with
compute as the model grows.

EP communicates once per optimizer step (the gradient, like backprop's data parallelism) but
computes T1 + 2 T2 relaxation steps per example for it, so the all-reduce is a small share of
a step unless the per-rank slice is tiny. The pytest-benchmark timing is the in-process
single-process step (the baseline the 2-process numbers are compared with); the rest is
reported through ``record()`` (group ``distributed``): per world size, the median step time
(slowest rank), the ep_backward time, the all-reduce time inside the step and alone, and the
all-reduce of a full-width VGG-5 gradient (13.5 MB) for scale.

Run: ``pytest bench/test_bench_distributed.py --benchmark-only`` (about 2 minutes on 2 cores).
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from ep_kernels.models import build_network

from conftest import record

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK = os.environ.get("EP_BENCH_QUICK") == "1"
# name: preset, width, input shape, global batch, T1, T2
MODELS = {
    "small": ("small", 1.0, "1x8x8", 32, 30, 10),
    "vgg5-w0.5": ("vgg5", 0.5, "3x32x32", 8 if QUICK else 16, 10 if QUICK else 20, 4 if QUICK else 6),
}
STEPS = 2 if QUICK else 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_worker(nproc, model, out):
    preset, width, shape, batch, T1, T2 = MODELS[model]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", os.path.join(HERE, "_dist_worker.py"), "--preset", preset,
           "--width", str(width), "--in-shape", shape, "--batch", str(batch), "--T1", str(T1), "--T2", str(T2),
           "--steps", str(STEPS), "--out", out]
    p = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("model", list(MODELS))
def test_step_one_vs_two_processes(benchmark, model, tmp_path):
    preset, width, shape, batch, T1, T2 = MODELS[model]
    in_shape = tuple(int(v) for v in shape.split("x"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = build_network(preset, in_shape, 10, width=width, T1=T1, T2=T2)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.rand(batch, *in_shape), torch.randint(0, 10, (batch,))

        def step():
            opt.zero_grad()
            net.ep_backward(x, y)
            opt.step()

        benchmark.group = f"distributed step {model}"
        benchmark.extra_info.update(baseline=True, batch=batch, T1=T1, T2=T2)
        benchmark.pedantic(step, rounds=STEPS, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    for nproc in (1, 2):
        r = torchrun_worker(nproc, model, str(tmp_path / f"{nproc}.json"))
        record("distributed", f"{model} x{nproc} proc (batch {batch}, T1={T1} T2={T2})",
               step_ms=1e3 * r["step_s"], ep_backward_ms=1e3 * r["ep_backward_s"],
               allreduce_in_step_ms=1e3 * r["allreduce_in_step_s"], allreduce_alone_ms=1e3 * r["allreduce_alone_s"],
               comm_share=r["allreduce_in_step_s"] / r["step_s"], grad_MB=r["grad_MB"],
               vgg5_full_allreduce_ms=1e3 * r["vgg5_full_allreduce_s"])
