"""Relaxation benchmarks on VGG-5 (docs/design.md, "The ops").

One relaxation step and one full ``ep_backward`` (T1 = 250, T2 = 25, symmetric) at batch
32, float32, for three implementations of the same mathematics:

- ``autograd-phi``: ``ep_reference``, the way the published EP codes relax (autograd of
  Phi each step). The baseline.
- ``explicit-dense``: ``EPNetwork`` on the ``reference`` backend (conv, max-pool with
  indices, max-unpool, dense transposed conv: plain torch ops).
- ``fused-cpu``: ``EPNetwork`` on the compiled ``cpu`` backend.

Also: the fraction of the machine's float32 convolution rate a fused step reaches; early
stopping (steps per phase, agreement with the fixed-step gradient); peak memory of EP and
BPTT as T1 grows (each in its own process, so the peak belongs to that run alone).

Run: ``pytest bench/ --benchmark-only`` (a few minutes on 2 cores). Set
``EP_BENCH_QUICK=1`` for a smoke run on small shapes.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import ep_reference
from ep_kernels import testing, use_backend
from ep_kernels.relaxation import ACTIVATION_GAIN, prepare_layers, relax

from conftest import record

QUICK = os.environ.get("EP_BENCH_QUICK") == "1"
BATCH = 4 if QUICK else 32
T1, T2 = (20, 5) if QUICK else (250, 25)


def vgg5(dtype=torch.float32, seed=0):
    return testing.vgg5(width=1 / 16 if QUICK else 1.0, dtype=dtype, seed=seed)


def batch(n=BATCH, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def setup():
    net = vgg5()
    x, y = batch()
    states, _ = net.free_phase(x, T1=20)  # a typical mid-relaxation state, not zeros
    return net, x, y, states


# -- one relaxation step ------------------------------------------------------------------
@pytest.mark.benchmark(group="vgg5 one relaxation step, batch 32")
def test_step_autograd_phi(benchmark, setup):
    net, x, _, states = setup
    ref = ep_reference.ReferenceNet.from_module(net)
    benchmark.extra_info["baseline"] = True
    benchmark.pedantic(lambda: ep_reference.step(ref, x, states), rounds=5, warmup_rounds=1)


PATHS = {"explicit-dense": ("reference", None), "fused-cpu": ("cpu", None),
         "fused-cpu-bf16": ("cpu", torch.bfloat16)}


def bench_relax(benchmark, setup, steps, backend, rounds, compute_dtype=None, schedule="synchronous"):
    """Time ``steps`` relaxation steps of the fused loop (``relaxation.relax``) from the setup's
    mid-relaxation states, weights prepared and first drive computed once outside the timing."""
    net, x, _, states = setup
    gain = ACTIVATION_GAIN[net.activation]
    with use_backend(backend), torch.no_grad():
        prepared = prepare_layers(net.layers, compute_dtype)
        first = net.layers[0].drive(x, prepared[0])
        spare = [torch.empty_like(s) for s in states]
        run = lambda: relax(net.layers, x, [s.clone() for s in states], steps, gain, first_drive=first,  # noqa: E731
                            spare=spare, prepared=prepared, schedule=schedule)
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("path", list(PATHS))
def test_step_explicit(benchmark, setup, path):
    net, x, _, _ = setup
    backend, compute_dtype = PATHS[path]
    benchmark.group = "vgg5 one relaxation step, batch 32"
    benchmark.name = f"test_step_explicit[{path}]"
    bench_relax(benchmark, setup, 1, backend, 5, compute_dtype)
    flops = testing.step_flops(net, x)
    benchmark.extra_info["gflop_per_step_dense"] = flops / 1e9
    benchmark.extra_info["effective_gflops"] = flops / benchmark.stats.stats.mean / 1e9


@pytest.mark.parametrize("schedule", ["synchronous", "alternating"])
def test_steps_by_schedule(benchmark, setup, schedule):
    """Ten steps of each schedule on the fused CPU path: the alternating one computes each
    layer's drive once per step too (plus one extra set of pooled drives on its first step)."""
    benchmark.group = "vgg5 ten relaxation steps by schedule, batch 32, fused-cpu"
    benchmark.name = f"test_steps_by_schedule[{schedule}]"
    if schedule == "synchronous":
        benchmark.extra_info["baseline"] = True
    bench_relax(benchmark, setup, 10, "cpu", 3, schedule=schedule)


@pytest.mark.benchmark(group="machine float32 convolution rate")
def test_machine_conv_rate(benchmark):
    """A large plain convolution: the rate the machine reaches, to read step times against."""
    c = 64 if QUICK else 256
    x = torch.rand(BATCH, c, 16, 16)
    w = torch.rand(c, c, 3, 3)
    benchmark.pedantic(lambda: torch.nn.functional.conv2d(x, w, padding=1), rounds=10, warmup_rounds=2)
    flops = 2 * BATCH * c * 16 * 16 * c * 9
    benchmark.extra_info["gflops"] = flops / benchmark.stats.stats.mean / 1e9


# -- a full ep_backward -------------------------------------------------------------------
@pytest.mark.benchmark(group="vgg5 ep_backward T1=250 T2=25 symmetric, batch 32")
def test_ep_backward_autograd_phi(benchmark, setup):
    net, x, y, _ = setup
    ref = ep_reference.ReferenceNet.from_module(net)
    benchmark.extra_info["baseline"] = True
    benchmark.pedantic(lambda: ep_reference.ep_gradient(ref, x, y, 0.5, T1, T2), rounds=1, warmup_rounds=0)


@pytest.mark.parametrize("path", list(PATHS))
def test_ep_backward_explicit(benchmark, setup, path):
    net, x, y, _ = setup
    backend, compute_dtype = PATHS[path]
    benchmark.group = "vgg5 ep_backward T1=250 T2=25 symmetric, batch 32"
    benchmark.name = f"test_ep_backward[{path}]"

    def run():
        net.zero_grad(set_to_none=True)
        return net.ep_backward(x, y, beta=0.5, T1=T1, T2=T2)

    net.compute_dtype = compute_dtype
    try:
        with use_backend(backend):
            benchmark.pedantic(run, rounds=1, warmup_rounds=0)
            res = run()
    finally:
        net.compute_dtype = None
    # The fast path computes the same states: compare with the reference once.
    if path == "fused-cpu":
        ref = ep_reference.ReferenceNet.from_module(net)
        s_ref = ep_reference.free_phase(ref, x, T1)
        s_ours, _ = net.free_phase(x, T1=T1)
        err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(s_ours, s_ref))
        record("vgg5 fused-cpu states vs autograd-phi after T1", "max relative error", value=err)
    assert res.loss.isfinite()


# -- early stopping -----------------------------------------------------------------------
def test_early_stopping_steps_and_agreement(benchmark, setup):
    """Phases stop once every layer's max change is below tol; how many steps that takes and
    how close the gradient stays to the fixed-step one."""
    net, x, y, _ = setup
    benchmark.group = "vgg5 ep_backward with early stopping, batch 32"
    net.zero_grad(set_to_none=True)
    net.ep_backward(x, y, beta=0.5, T1=T1, T2=T2)
    fixed = {n: p.grad.clone() for n, p in net.named_parameters()}
    for tol in (1e-3, 1e-5):
        net.zero_grad(set_to_none=True)
        res = net.ep_backward(x, y, beta=0.5, T1=T1, T2=T2, tol=tol)
        cos = {n: torch.nn.functional.cosine_similarity(p.grad.flatten(), fixed[n].flatten(), dim=0).item()
               for n, p in net.named_parameters()}
        record("early stopping (fixed-step run: T1=%d, T2=%d)" % (T1, T2), f"tol={tol:g}",
               free_steps=res.diagnostics["free"]["steps"], nudged_steps=res.diagnostics["nudged"]["steps"],
               min_cosine_vs_fixed=min(cos.values()))

    def run():
        net.zero_grad(set_to_none=True)
        net.ep_backward(x, y, beta=0.5, T1=T1, T2=T2, tol=1e-5)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)


# -- memory -------------------------------------------------------------------------------
_MEM_SCRIPT = r"""
import json, resource, sys, torch
sys.path.insert(0, {bench!r})
from test_bench_relaxation import vgg5, batch
algo, T1, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
net = vgg5(); x, y = batch(n)
net.ep_backward(x, y, T1=1, T2=1); net.zero_grad()   # warm the allocator and the plan
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if algo == "ep":
    net.ep_backward(x, y, beta=0.5, T1=T1, T2=25)
else:
    net.bptt_backward(x, y, T1=T1)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
plan = net.plan_for(x)
# EP's own memory: two state buffer sets for the batch and two for the nudged phases' 2N batch
states = sum(b.numel() * b.element_size() for m in (n, 2 * n) for pair in plan.buffers(m) for b in pair)
params = sum(p.numel() * p.element_size() for p in net.parameters())
print(json.dumps({{"peak_mib": peak / 1024, "growth_mib": (peak - base) / 1024, "state_buffers_mib": states / 2**20,
                  "parameters_mib": params / 2**20}}))
"""


@pytest.mark.parametrize("T1_mem", [50, 100, 250])
def test_peak_memory_ep_vs_bptt(benchmark, T1_mem):
    """Peak resident memory of one ep_backward and one bptt_backward (batch 32), and EP's
    state buffers (what it must keep: two sets per batch size) against the rest (parameters,
    the process, and the transient workspace of the convolutions)."""
    benchmark.group = "peak memory (see measurements)"
    n = 2 if QUICK else BATCH
    t1 = max(5, T1_mem // 10) if QUICK else T1_mem
    script = _MEM_SCRIPT.format(bench=os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for algo in ("ep", "bptt"):
        r = subprocess.run([sys.executable, "-c", script, algo, str(t1), str(n)], capture_output=True, text=True,
                           check=True)
        out[algo] = json.loads(r.stdout.strip().splitlines()[-1])
    # Growth: over the process's peak after a warm-up call (EP's state buffers, allocated
    # once per shape, are already there; BPTT's graph grows with T1). Peak: the whole process.
    record("peak memory of one call, MiB (vgg5, batch %d)" % n, f"T1={t1}",
           ep_growth=out["ep"]["growth_mib"], bptt_growth=out["bptt"]["growth_mib"],
           ep_peak=out["ep"]["peak_mib"], bptt_peak=out["bptt"]["peak_mib"],
           peak_ratio_bptt_over_ep=out["bptt"]["peak_mib"] / out["ep"]["peak_mib"],
           growth_ratio_bptt_over_ep=out["bptt"]["growth_mib"] / max(out["ep"]["growth_mib"], 1e-9),
           ep_state_buffers=out["ep"]["state_buffers_mib"], parameters=out["ep"]["parameters_mib"])
    benchmark.pedantic(lambda: None, rounds=1)
