"""The GPU path: the CUDA-graph phases (``ep_kernels.cuda_graphs``) and the 'cuda' backend.

Without a GPU (CI) only the first part runs: the chunked phase runner that the graphs capture,
run eagerly on CPU (``capture=False``), against the eager engine: same steps, same states,
same reports, same gradients. The second part needs a GPU (skipped otherwise): the CUDA
kernels against the references, and captured graphs against the eager path. bench/gpu_check.sh
runs these on the GPU machine.
"""
import pytest
import torch

import ep_kernels
import ep_kernels.ops as ops
from ep_kernels import RelaxationDiverged, _backend, cuda_graphs, engine, relaxation, use_backend
from ep_kernels.testing import grads, make_batch, small_net
from ep_kernels import testing
from ep_kernels.testing import CASE_IDS, CONV_CASES

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread for tiny tensors; no TF32 on a GPU (exact float32/float64 comparisons)."""
    old = torch.get_num_threads(), torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.set_num_threads(old[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old[1:]


def _same_states(a, b):
    assert len(a) == len(b)
    for s, r in zip(a, b):
        assert torch.equal(s, r)


# --------------------------------------------------------------------------------------------
# the chunked runner, eagerly on CPU: the logic the graphs capture
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,check_every,tol", [(7, 3, None), (6, 2, None), (1, 10, None), (40, 5, 1e-3), (0, 3, None)])
@pytest.mark.parametrize("kind", ["conv_pool", "mixed"])
def test_free_phase_chunks_match_eager(kind, T, check_every, tol):
    net = small_net(kind, torch.float64, seed=3)
    x, _ = make_batch(n=3, dtype=torch.float64, seed=4)
    gain = relaxation.ACTIVATION_GAIN[net.activation]
    with torch.no_grad():
        plan = net.plan_for(x)
        s_eager, rep_eager = engine.free_phase(net.layers, plan, x, T, gain, tol, check_every)
        s_eager = [s.clone() for s in s_eager]
        plan2 = relaxation.Plan(net.layers, x.shape, x.dtype, x.device)
        for _ in range(2):  # the second run reuses the runner
            s_graph, rep_graph = cuda_graphs.free_phase(net.layers, plan2, x, T, gain, tol, check_every,
                                                        capture=False)
            _same_states(s_graph, s_eager)
            assert rep_graph.as_dict() == rep_eager.as_dict()
    if tol is not None:
        assert rep_graph.converged and rep_graph.steps < T and rep_graph.steps % check_every == 0


@pytest.mark.parametrize("T,check_every", [(5, 2), (4, 4)])
def test_nudged_phase_chunks_match_eager(T, check_every):
    net = small_net("conv_pool", torch.float64, seed=5)
    x, y = make_batch(n=3, dtype=torch.float64, seed=6)
    gain = relaxation.ACTIVATION_GAIN[net.activation]
    betas = torch.tensor([0.3, -0.3, 0.5], dtype=torch.float64)
    with torch.no_grad():
        plan = net.plan_for(x)
        s_star, _ = engine.free_phase(net.layers, plan, x, 8, gain)
        s_star = [s.clone() for s in s_star]
        s_e, rep_e = engine.nudged_phase(net, plan, x, y, None, s_star, betas, T, gain, None, check_every)
        s_e = [s.clone() for s in s_e]
        plan2 = relaxation.Plan(net.layers, x.shape, x.dtype, x.device)
        for b in (betas, betas.flip(0)):  # new y/beta values flow through the static inputs
            s_g, rep_g = cuda_graphs.nudged_phase(net, plan2, x, y, None, s_star, b, T, gain, None, check_every,
                                                  capture=False)
            if b is betas:
                _same_states(s_g, s_e)
                assert rep_g.as_dict() == rep_e.as_dict()
        s_e2, _ = engine.nudged_phase(net, plan, x, y, None, s_star, betas.flip(0), T, gain, None, check_every)
        _same_states(s_g, s_e2)


def test_runner_recreated_when_parameters_are_replaced():
    net = small_net("conv_pool", torch.float64, seed=5)
    x, y = make_batch(n=2, dtype=torch.float64, seed=6)
    gain = relaxation.ACTIVATION_GAIN[net.activation]
    betas = torch.full((2,), 0.4, dtype=torch.float64)
    with torch.no_grad():
        plan = net.plan_for(x)
        s_star = [torch.rand((2,) + s, dtype=torch.float64) for s in plan.state_shapes]
        cuda_graphs.nudged_phase(net, plan, x, y, None, s_star, betas, 3, gain, capture=False)
        runners = plan._cuda_graph_runners[("nudged", 2)]
        (r1,) = runners.values()
        net.readout.weight.mul_(0.5)  # in place: the same runner (a captured graph stays valid)
        cuda_graphs.nudged_phase(net, plan, x, y, None, s_star, betas, 3, gain, capture=False)
        assert list(runners.values()) == [r1]
        # Runners are keyed by the storage a graph reads: keep the replaced weights alive, so
        # that their addresses are not reused by the new ones (a reused address with the same
        # shape is the same key, and rightly so: the graph reads that storage).
        replaced = [net.readout.weight]
        net.readout.weight = torch.nn.Parameter(net.readout.weight.clone())  # replaced: a new one
        cuda_graphs.nudged_phase(net, plan, x, y, None, s_star, betas, 3, gain, capture=False)
        assert len(runners) == 2 and list(runners.values())[-1] is not r1
        for _ in range(5):  # keys that keep changing: at most 4 runners are kept
            replaced.append(net.readout.weight)
            net.readout.weight = torch.nn.Parameter(net.readout.weight.clone())
            cuda_graphs.nudged_phase(net, plan, x, y, None, s_star, betas, 3, gain, capture=False)
        assert len(runners) == 4 and r1 not in runners.values()


def test_runner_reports_divergence():
    net = small_net("conv_pool", torch.float64, seed=5)
    x, _ = make_batch(n=2, dtype=torch.float64, seed=6)
    x[0, 0, 0, 0] = float("nan")
    gain = relaxation.ACTIVATION_GAIN[net.activation]
    with torch.no_grad():
        plan = net.plan_for(x)
        with pytest.raises(RelaxationDiverged, match="free phase: state of layer 0 became NaN at step 3"):
            cuda_graphs.free_phase(net.layers, plan, x, 9, gain, None, 3, capture=False)
        with pytest.raises(RelaxationDiverged, match="free phase: state of layer 0 became NaN at step 3"):
            engine.free_phase(net.layers, plan, x, 9, gain, None, 3)


@pytest.mark.parametrize("nudging", ["symmetric", "one-sided"])
def test_ep_backward_through_the_graph_path_matches_eager(nudging, monkeypatch):
    """The engine's hook, taken on CPU (the runner then runs its chunks eagerly): the same
    gradients, bitwise, and the same diagnostics."""
    net = small_net("conv_pool", torch.float64, seed=7)
    x, y = make_batch(n=3, dtype=torch.float64, seed=8)
    net.zero_grad(set_to_none=True)
    r_e = net.ep_backward(x, y, beta=0.3, T1=9, T2=4, nudging=nudging, tol=1e-9)
    g_e = grads(net)
    calls = []
    monkeypatch.setattr(cuda_graphs, "active_for", lambda t: calls.append(1) or True)
    net.zero_grad(set_to_none=True)
    r_g = net.ep_backward(x, y, beta=0.3, T1=9, T2=4, nudging=nudging, tol=1e-9)
    assert len(calls) == 2  # free and nudged phases took the hook
    g_g = grads(net)
    for name in g_e:
        assert torch.equal(g_g[name], g_e[name]), name
    assert r_g.diagnostics["free"] == r_e.diagnostics["free"]
    assert r_g.diagnostics["nudged"] == r_e.diagnostics["nudged"]


def test_enabling(monkeypatch):
    monkeypatch.delenv("EP_KERNELS_CUDA_GRAPHS", raising=False)
    assert not cuda_graphs.enabled()
    with cuda_graphs.use_cuda_graphs():
        assert cuda_graphs.enabled()
        assert not cuda_graphs.active_for(torch.zeros(1))  # CPU tensors never capture
        with cuda_graphs.use_cuda_graphs(False):
            assert not cuda_graphs.enabled()
    monkeypatch.setenv("EP_KERNELS_CUDA_GRAPHS", "1")
    assert cuda_graphs.enabled()


def test_cuda_backend_errors_without_gpu_tensors(no_backend_env):
    d = torch.rand(2, 3)
    with use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' was asked for but the tensors are on cpu"):
        ops.state_update(d, None, None, None, 1.0, torch.empty_like(d))
    if not _backend.cuda_kernels_available():
        assert "cuda" not in ep_kernels.available_backends()


# --------------------------------------------------------------------------------------------
# on a GPU
# --------------------------------------------------------------------------------------------

# On a GPU machine both GPU backends must be there: a missing one is a failure, not a skip.
GPU_BACKENDS = ["cuda", "triton"]


def _require(backend):
    if backend == "cuda":
        assert _backend.cuda_kernels_available(), (
            "a GPU is present but the extension was built without CUDA kernels: rebuild with nvcc on PATH "
            "(bench/gpu_check.sh does)")
    elif backend == "triton":
        assert _backend.triton_installed(), "a GPU is present but triton is not installed"


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_gpu_ops_match_reference(case, backend, dtype, gen):
    """The harness's checks (the CPU and Triton tests' own), on CUDA tensors."""
    _require(backend)
    testing.check_conv_pool_drive(backend, "cuda", dtype, case, gen)
    testing.check_pool_conv_transpose(backend, "cuda", dtype, case, gen)
    testing.check_contrastive_conv_grad(backend, "cuda", dtype, case, gen)
    testing.check_state_update(backend, "cuda", dtype, case[:4], 0.5, "all", gen)


@gpu
@pytest.mark.parametrize("backend", ["reference"] + GPU_BACKENDS)
def test_cuda_graphs_match_eager_on_gpu(backend):
    _require(backend)
    net = small_net("conv_pool", torch.float64, seed=7).cuda()
    x, y = make_batch(n=3, dtype=torch.float64, seed=8)
    x, y = x.cuda(), y.cuda()
    out = {}
    for graphs in (False, True, True):  # the second graph run replays the captured graphs
        with use_backend(backend), cuda_graphs.use_cuda_graphs(graphs):
            net.zero_grad(set_to_none=True)
            r = net.ep_backward(x, y, beta=0.3, T1=9, T2=4, keep_states=True)
            out.setdefault(graphs, []).append((r, grads(net)))
    (r_e, g_e), = out[False]
    for r_g, g_g in out[True]:
        # Not bitwise, unlike the CPU runner tests: cuDNN's convolutions (the reference backend's)
        # differ by an ulp between captured and eager launches (measured on an H200: 5.6e-17).
        for phase in ("free", "plus", "minus"):
            for s_g, s_e in zip(r_g.states[phase], r_e.states[phase], strict=True):
                torch.testing.assert_close(s_g, s_e, rtol=0, atol=1e-14)
        assert [r_g.diagnostics[p]["steps"] for p in ("free", "nudged")] == \
            [r_e.diagnostics[p]["steps"] for p in ("free", "nudged")]
        for name in g_e:
            torch.testing.assert_close(g_g[name], g_e[name], rtol=1e-9, atol=1e-14, msg=name)
