"""EPNetwork against the independent reference (ep_reference) and against BPTT."""
import pytest
import torch
import torch.nn as nn

import ep_reference
from ep_kernels import EPConv2d, EPLinear, EPNetwork, RelaxationDiverged, use_backend
from ep_kernels.testing import cosine, grads, make_batch, small_net, relerr

KINDS = ["conv_pool", "conv_nopool", "mixed", "linear"]
BACKENDS = ["reference", "cpu"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _flat(kind):
    return kind == "linear"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_free_phase_matches_reference(kind, dtype, backend):
    net = small_net(kind, dtype, seed=3, activation="hardsigmoid")
    x, _ = make_batch(dtype=dtype, seed=4, flat=_flat(kind))
    ref = ep_reference.ReferenceNet.from_module(net)
    with use_backend(backend):
        states, rep = net.free_phase(x, T1=25)
    ref_states = ep_reference.free_phase(ref, x, 25)
    assert len(states) == len(ref_states)
    for s, r in zip(states, ref_states):
        # Relative to the state's scale (states live in [0, 1]).
        err = (s - r.view_as(s)).abs().max().item() / max(r.abs().max().item(), 1e-30)
        assert err <= TOL[dtype], f"{kind} {dtype} {backend}: rel err {err}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_ties_broken_like_max_pool2d(backend):
    # Zero input: at the first steps every position of a window holds the bias, an exact tie.
    net = small_net("conv_pool", torch.float64, seed=5)
    x = torch.zeros(3, 2, 8, 8, dtype=torch.float64)
    ref = ep_reference.ReferenceNet.from_module(net)
    for T in (1, 2, 3):
        with use_backend(backend):
            states, _ = net.free_phase(x, T1=T)
        for s, r in zip(states, ep_reference.free_phase(ref, x, T)):
            torch.testing.assert_close(s, r.view_as(s), rtol=0, atol=1e-12)


def _ep_vs_bptt(net, x, y, beta, T1, T2, nudging="symmetric"):
    net.zero_grad(set_to_none=True)
    res = net.ep_backward(x, y, beta=beta, T1=T1, T2=T2, nudging=nudging)
    g_ep = grads(net)
    net.zero_grad(set_to_none=True)
    net.bptt_backward(x, y, T1=T1)
    g_bptt = grads(net)
    return res, g_ep, g_bptt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [2, 3])
def test_ep_matches_bptt_float64(seed, backend):
    """docs/design.md, "How gradients are judged": in float64, converged phases, beta 1e-3, symmetric EP = BPTT to cos >= 0.9999.

    Holds where no max-pool winner or clamp boundary switches between s+ and s- (with
    seed 1 one unit crosses the clamp boundary and cosine drops to 0.9995; ep-gradcheck
    reports such switches, see test_gradcheck.py)."""
    net = small_net("conv_pool", torch.float64, seed=seed)
    x, y = make_batch(n=5, seed=seed + 10)
    with use_backend(backend):
        res, g_ep, g_bptt = _ep_vs_bptt(net, x, y, 1e-3, 250, 80)
    assert max(res.diagnostics["free"]["residual"]) < 1e-12  # converged
    for n in g_ep:
        assert cosine(g_ep[n], g_bptt[n]) >= 0.9999, n
        assert relerr(g_ep[n], g_bptt[n]) < 1e-2, n


def test_fast_bptt_matches_independent_bptt():
    net = small_net("conv_pool", torch.float64, seed=2)
    x, y = make_batch(seed=7)
    net.zero_grad(set_to_none=True)
    net.bptt_backward(x, y, T1=15)  # unconverged on purpose: BPTT is exact for any T1
    ours = grads(net)
    ref = ep_reference.bptt_gradient(ep_reference.ReferenceNet.from_module(net), x, y, 15).grads
    for n in ours:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-9, atol=1e-12)


def test_fast_ep_matches_independent_ep():
    net = small_net("mixed", torch.float64, seed=4)
    x, y = make_batch(seed=8)
    net.zero_grad(set_to_none=True)
    net.ep_backward(x, y, beta=0.3, T1=40, T2=12)  # large beta, unconverged: still the same arithmetic
    ours = grads(net)
    ref = ep_reference.ep_gradient(ep_reference.ReferenceNet.from_module(net), x, y, 0.3, 40, 12).grads
    for n in ours:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("nudging", ["one-sided", "random-sign"])
def test_one_sided_nudging_close_to_bptt(nudging):
    net = small_net("conv_pool", torch.float64, seed=1)
    x, y = make_batch(n=5, seed=11)
    torch.manual_seed(0)
    _, g_ep, g_bptt = _ep_vs_bptt(net, x, y, 1e-4, 250, 80, nudging)
    for n in g_ep:
        assert cosine(g_ep[n], g_bptt[n]) >= 0.999, n


def test_symmetric_bias_smaller_than_one_sided():
    net = small_net("linear", torch.float64, seed=6)
    x, y = make_batch(seed=12, flat=True)
    _, g_sym, g_bptt = _ep_vs_bptt(net, x, y, 0.05, 300, 150, "symmetric")
    _, g_one, _ = _ep_vs_bptt(net, x, y, 0.05, 300, 150, "one-sided")
    w = "layers.0.weight"
    assert relerr(g_sym[w], g_bptt[w]) < relerr(g_one[w], g_bptt[w])


def test_mse_mode_ep_matches_bptt():
    net = small_net("linear", torch.float64, seed=2, mse=True)
    x, y = make_batch(seed=13, flat=True)
    _, g_ep, g_bptt = _ep_vs_bptt(net, x, y, 1e-4, 300, 150)
    assert net.mode == "mse"
    for n in g_ep:
        assert cosine(g_ep[n], g_bptt[n]) >= 0.9999, n


def test_grads_accumulate_and_optimizer_steps():
    net = small_net("conv_pool", torch.float32, seed=0)
    x, y = make_batch(dtype=torch.float32, seed=14)
    net.ep_backward(x, y, T1=10, T2=4)
    g1 = grads(net)
    assert set(g1) == {n for n, _ in net.named_parameters()}
    assert all(g.abs().sum() > 0 for g in g1.values())
    net.ep_backward(x, y, T1=10, T2=4)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, 2 * g1[n])
    before = [p.detach().clone() for p in net.parameters()]
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert all(not torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_state_buffers_reused_across_calls():
    net = small_net("conv_pool", torch.float32)
    x, y = make_batch(dtype=torch.float32)
    net.ep_backward(x, y, T1=3, T2=2)
    plan = net.plan_for(x)
    ptrs = [b.data_ptr() for pair in plan.buffers(x.shape[0]) for b in pair]
    net.ep_backward(x, y, T1=3, T2=2)
    assert ptrs == [b.data_ptr() for pair in net.plan_for(x).buffers(x.shape[0]) for b in pair]


def test_early_stopping_with_tol():
    net = small_net("conv_pool", torch.float64, seed=1)
    x, y = make_batch(seed=15)
    states, rep = net.free_phase(x, T1=500, tol=1e-9)
    assert rep.converged and rep.steps < 500
    full, _ = net.free_phase(x, T1=500)
    for a, b in zip(states, full):
        assert (a - b).abs().max() < 1e-8


def test_state_dict_moves_to_plain_layers():
    ep = EPConv2d(3, 4, 3, padding=1, pool=2)
    plain = nn.Conv2d(3, 4, 3, padding=1)
    plain.load_state_dict(ep.state_dict())
    ep.load_state_dict(plain.state_dict())
    lin = EPLinear(5, 3)
    nn.Linear(5, 3).load_state_dict(lin.state_dict())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(ep(x), torch.nn.functional.max_pool2d(plain(x), 2))


# -- errors ---------------------------------------------------------------------------
@pytest.fixture
def small():
    return small_net("conv_pool", torch.float32), *make_batch(dtype=torch.float32)


def test_errors_bad_inputs(small):
    net, x, y = small
    with pytest.raises(ValueError, match="channels"):
        net(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        net(torch.rand(2, 8, 8))
    with pytest.raises(TypeError, match="dtype"):
        net(x.double())
    with pytest.raises(ValueError, match="NaN or infinite"):
        net(torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="too small"):
        net(torch.rand(2, 2, 3, 3))
    with pytest.raises(ValueError, match="on meta"):
        net(torch.empty(2, 2, 8, 8, device="meta"))
    with pytest.raises(TypeError, match="int64"):
        net.ep_backward(x, y.float())
    with pytest.raises(ValueError, match="outside"):
        net.ep_backward(x, y + 10)
    with pytest.raises(ValueError, match="shape"):
        net.ep_backward(x, y[:2])
    with pytest.raises(ValueError, match="beta"):
        net.ep_backward(x, y, beta=-1.0)
    with pytest.raises(ValueError, match="beta"):
        net.ep_backward(x, y, beta=float("inf"))
    with pytest.raises(ValueError, match="T1"):
        net.ep_backward(x, y, T1=0)
    with pytest.raises(ValueError, match="nudging"):
        net.ep_backward(x, y, nudging="both")


def test_errors_bad_construction():
    with pytest.raises(ValueError, match="pool"):
        EPConv2d(1, 2, 3, pool=0)
    with pytest.raises(ValueError, match="padding_mode"):
        EPConv2d(1, 2, 3, padding_mode="circular")
    with pytest.raises(TypeError, match="layer 0"):
        EPNetwork(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="activation"):
        EPNetwork(EPLinear(4, 2), activation="relu")
    with pytest.raises(ValueError, match="layer 1"):
        EPNetwork(EPLinear(4, 3), EPLinear(5, 2))(torch.rand(2, 4))


def test_nonfinite_parameters_and_diverging_states(small):
    net, x, y = small
    with torch.no_grad():
        net.layers[1].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.1.weight"):
        net.ep_backward(x, y)
    with torch.no_grad():
        # +inf drive into layer 0 meets a -inf top-down from layer 1: inf - inf = NaN.
        net.layers[0].weight.fill_(3e38)
        net.layers[1].weight.fill_(-3e38)
        net.layers[1].bias.fill_(1.0)
    with pytest.raises(RelaxationDiverged, match="NaN"):
        net.ep_backward(x, y, T1=20)


def test_bfloat16_compute_keeps_float32_states_close():
    net = small_net("conv_pool", torch.float32, seed=2)
    x, y = make_batch(dtype=torch.float32, seed=16)
    exact, _ = net.free_phase(x, T1=30)
    net.compute_dtype = torch.bfloat16
    approx, _ = net.free_phase(x, T1=30)
    for a, b in zip(approx, exact):
        assert a.dtype == torch.float32
        assert (a - b).abs().max() < 3e-2  # bf16 has 8 mantissa bits; states live in [0, 1]
    net.zero_grad(set_to_none=True)
    res = net.ep_backward(x, y, T1=30, T2=10)
    assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in net.parameters())
    assert res.loss.isfinite()
    with pytest.raises(ValueError, match="compute_dtype"):
        EPNetwork(EPLinear(4, 2), compute_dtype=torch.int8)


def test_free_phase_continues_from_given_states():
    """``init`` / ``free_init``: a phase continued from its own end state takes up where it
    stopped (the states of T1 + T steps), and ep_backward accepts the same starting states."""
    net = small_net("conv_pool", torch.float64, seed=5)
    x, y = make_batch(n=3, dtype=torch.float64, seed=6)
    s10, _ = net.free_phase(x, T1=10)
    s25, _ = net.free_phase(x, T1=25)
    s_cont, rep = net.free_phase(x, T1=15, init=s10)
    assert rep.steps == 15
    for a, b in zip(s_cont, s25):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    r = net.ep_backward(x, y, T1=15, T2=4, keep_states=True, free_init=s10)
    for a, b in zip(r.states["free"], s25):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match=r"init\[1\] must have shape"):
        net.free_phase(x, init=[s10[0], s10[1][:1]])
    with pytest.raises(TypeError, match="init must be a list of 2 state tensors"):
        net.free_phase(x, init=s10[:1])


def test_cpu_phases_stop_at_the_first_converged_step():
    """On CPU the default checks convergence after every step (reading the changes costs
    microseconds), so a phase stops at the first step whose change is below tol; an explicit
    check_every keeps multiples of it."""
    x, _ = make_batch(n=3, dtype=torch.float64, seed=6)
    every = small_net("conv_pool", torch.float64, seed=5)
    _, rep = every.free_phase(x, T1=200, tol=1e-8)
    tens = small_net("conv_pool", torch.float64, seed=5, check_every=10)
    _, rep10 = tens.free_phase(x, T1=200, tol=1e-8)
    assert rep.converged and rep10.converged and rep10.steps % 10 == 0
    assert rep.steps <= rep10.steps < rep.steps + 10
    _, rep_before = every.free_phase(x, T1=rep.steps - 1)
    assert max(rep_before.residual) >= 1e-8 > max(rep.residual)


def test_converged_ep_gradient_matches_bptt_of_its_fixed_point():
    """EP* (float64, every phase converged, beta small) of a float32 path's free state: equal
    to the float64 BPTT gradient at that fixed point."""
    from ep_kernels.gradcheck import converged_ep_gradient

    net = small_net("conv_pool", torch.float32, seed=7)
    x, y = make_batch(n=4, dtype=torch.float32, seed=8)
    s32, _ = net.free_phase(x, T1=40)
    star, info = converged_ep_gradient(net, x, y, 1e-4, free_state=s32)
    assert info["free"]["converged"] and info["nudged"]["converged"]
    net64 = small_net("conv_pool", torch.float64, seed=7)
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    net64.bptt_backward(x.double(), y, T1=400)
    for name, p in net64.named_parameters():
        assert cosine(star[name], p.grad) > 0.99999, name


def test_bfloat16_phases_finish_in_the_parameters_dtype():
    """compute_dtype=bfloat16 with a tolerance: each phase relaxes in bfloat16 down to a change
    of LOW_PRECISION_TOL, then in float32 down to tol, so it ends at a float32 fixed point (one
    more float32 step changes it by less than tol), which bfloat16 steps alone never reach.
    (With max-pooling it may be another fixed point than a float32 run's from zero: each is
    judged against EP* of its own, bench/test_bench_time_to_gradient.py.)"""
    from ep_kernels.engine import LOW_PRECISION_TOL

    x, y = make_batch(n=4, dtype=torch.float32, seed=9)
    full = small_net("conv_pool", torch.float32, seed=4)
    mixed = small_net("conv_pool", torch.float32, seed=4, compute_dtype=torch.bfloat16)
    s_mixed, rep = mixed.free_phase(x, T1=400, tol=1e-6)
    assert rep.converged and max(rep.residual) < 1e-6
    _, one_more = full.free_phase(x, T1=1, init=s_mixed)
    assert max(one_more.residual) < 1e-6
    s_low, rep_low = mixed.free_phase(x, T1=rep.steps)  # no tol: every step in bfloat16
    _, one_more_low = full.free_phase(x, T1=1, init=s_low)
    assert max(one_more_low.residual) > 1e-6
    r = mixed.ep_backward(x, y, T1=400, T2=200, tol=1e-6)
    assert r.diagnostics["nudged"]["converged"] and max(r.diagnostics["nudged"]["residual"]) < 1e-6
    assert LOW_PRECISION_TOL > 1e-6
