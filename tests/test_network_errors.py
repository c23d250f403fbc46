"""The network under bad input, threads and unusual modes (issue 11): one table of bad inputs
to EPNetwork, each refused before any relaxation with a clear error (type and words), then one
test per behaviour the adversarial review found wrong: inference mode, threads, frozen
parameters, beta at the edges of the dtype, a stale plan after a layer is replaced.
"""
import copy
import pickle
import threading
import warnings

import pytest
import torch
import torch.nn as nn

from ep_kernels import EPConv2d, EPLinear, EPNetwork, use_backend
from ep_kernels.network import BETA_EPS_WARNING, check_beta
from ep_kernels.testing import grads, make_batch, small_net


def _net(dtype=torch.float32):
    return small_net("conv_pool", dtype=dtype, seed=0)


def _xy(dtype=torch.float32):
    return make_batch(n=3, dtype=dtype, seed=1)


def _wrong_readout():
    net = _net()
    net.readout = nn.Linear(27, 10)
    return net


def _nan_param():
    net = _net()
    with torch.no_grad():
        net.layers[1].weight[0, 0, 0, 0] = float("nan")
    return net


# (id, net builder, call(net, x, y), exception, words)
CASES = [
    ("x_not_tensor", _net, lambda n, x, y: n.ep_backward(x.tolist(), y), TypeError, "x must be a torch.Tensor"),
    ("x_nested", _net, lambda n, x, y: n(torch.nested.nested_tensor([x[0], x[1]])), TypeError,
     "x must be a dense .* nested"),
    ("x_sparse", _net, lambda n, x, y: n(x.to_sparse()), TypeError, "x must be a dense"),
    ("x_int_dtype", _net, lambda n, x, y: n((x * 10).long()), TypeError,
     r"x has dtype torch.int64 but the network's parameters are torch.float32; convert with x.to\(torch.float32\)$"),
    ("x_double", _net, lambda n, x, y: n(x.double()), TypeError, r"or net.to\(torch.float64\)"),
    ("x_3d", _net, lambda n, x, y: n(x[0]), ValueError, r"x must be \(N, C, H, W\)"),
    ("x_nan", _net, lambda n, x, y: n(x * float("nan")), ValueError, "x contains NaN"),
    ("y_float", _net, lambda n, x, y: n.ep_backward(x, y.float()), TypeError, "y must hold int64"),
    ("y_range", _net, lambda n, x, y: n.ep_backward(x, y + 10), ValueError, r"outside \[0, 10\)"),
    ("beta_zero", _net, lambda n, x, y: n.ep_backward(x, y, beta=0.0), ValueError, "beta must be a positive finite"),
    ("beta_overflows_f32", _net, lambda n, x, y: n.ep_backward(x, y, beta=1e39), ValueError,
     r"beta=1e\+39 is out of range for torch.float32"),
    ("beta_underflows_f32", _net, lambda n, x, y: n.ep_backward(x, y, beta=1e-300), ValueError,
     r"beta=1e-300 is out of range for torch.float32"),
    ("tol_string", _net, lambda n, x, y: n.ep_backward(x, y, tol="1e-3"), ValueError,
     "tol must be None or a positive finite number, got '1e-3'"),
    ("tol_string_ctor", None, lambda n, x, y: EPNetwork(EPLinear(4, 3), tol="1e-3"), ValueError,
     "tol must be None or a positive finite"),
    ("tol_negative", _net, lambda n, x, y: n.free_phase(x, tol=-1.0), ValueError,
     "tol must be None or a positive"),
    ("T1_zero", _net, lambda n, x, y: n.ep_backward(x, y, T1=0), ValueError, "T1 must be a positive int"),
    ("readout_mismatch", _wrong_readout, lambda n, x, y: n(x), ValueError,
     r"the readout nn.Linear\(27, 10\) does not fit the last layer's state: layer 1 gives shape \(7, 2, 2\) = 28"),
    ("nan_param_forward", _nan_param, lambda n, x, y: n(x), ValueError, "parameter layers.1.weight contains NaN"),
    ("nan_param_ep", _nan_param, lambda n, x, y: n.ep_backward(x, y), ValueError, "parameter layers.1.weight"),
    ("ep_backward_in_inference_mode", _net, lambda n, x, y: _in_inference(n.ep_backward, x, y), RuntimeError,
     r"ep_backward fills .grad, which torch.inference_mode\(\) does not allow"),
    ("bptt_in_inference_mode", _net, lambda n, x, y: _in_inference(n.bptt_backward, x, y), RuntimeError,
     r"bptt_backward fills .grad, which torch.inference_mode\(\) does not allow"),
]


def _in_inference(fn, x, y):
    with torch.inference_mode():
        return fn(x, y)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_relaxing(case):
    name, build, call, exc, words = case
    net = build() if build is not None else None
    x, y = _xy()
    before = {k: v.clone() for k, v in net.state_dict().items()} if net is not None else {}
    with pytest.raises(exc, match=words):
        call(net, x, y)
    if net is not None:  # nothing learned, no .grad filled
        assert all(p.grad is None for p in net.parameters())
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[k]) or torch.isnan(v).any()


def test_inference_mode_then_normal_calls():
    """A call under inference_mode keeps its own buffers: later normal calls work (they used to
    fail with 'Inplace update to inference tensor outside InferenceMode')."""
    net, (x, y) = _net(), _xy()
    with torch.inference_mode():
        logits_inf = net(x)
    logits = net(x)
    assert torch.equal(logits, logits_inf)
    net.ep_backward(x, y, T1=5, T2=2)
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_threads_on_one_network_give_the_serial_results(backend):
    """Two threads calling ep_backward on one network with different batches: each result, and
    the accumulated gradient, equal those of the two calls made one after the other."""
    xs = [make_batch(n=4, dtype=torch.float64, seed=s) for s in (11, 12)]
    serial = _net(torch.float64)
    with use_backend(backend):
        ref_res = [serial.ep_backward(x, y, T1=12, T2=4, keep_states=True) for x, y in xs]
    ref_grads = grads(serial)
    for _ in range(3):
        net = _net(torch.float64)
        results = [None, None]
        errors = []

        def run(i):
            try:
                with use_backend(backend):
                    results[i] = net.ep_backward(*xs[i], T1=12, T2=4, keep_states=True)
            except Exception as e:  # noqa: BLE001 - re-raised below in the main thread
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for r, rr in zip(results, ref_res):
            for a, b in zip(r.states["plus"], rr.states["plus"]):
                assert torch.equal(a, b)
        g = grads(net)
        for k in ref_grads:  # two terms: a + b == b + a exactly
            assert torch.equal(g[k], ref_grads[k]), k


def test_network_survives_copy_and_pickle():
    net = _net()
    x, _ = _xy()
    out = net(x)
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert torch.equal(clone(x), out)


@pytest.mark.parametrize("frozen", ["layers.0.weight", "layers.1.bias", "readout.weight"])
def test_frozen_parameters_are_not_trained(frozen):
    """requires_grad=False: ep_backward leaves .grad None (as autograd and bptt_backward do),
    and the other parameters get the gradient they get when nothing is frozen."""
    x, y = make_batch(n=4, dtype=torch.float64, seed=3)
    full = _net(torch.float64)
    full.ep_backward(x, y, T1=10, T2=4)
    net = _net(torch.float64)
    dict(net.named_parameters())[frozen].requires_grad_(False)
    net.ep_backward(x, y, T1=10, T2=4)
    for name, p in net.named_parameters():
        if name == frozen:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, dict(full.named_parameters())[name].grad, rtol=1e-12, atol=1e-15)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = dict(net.named_parameters())[frozen].detach().clone()
    opt.step()
    assert torch.equal(dict(net.named_parameters())[frozen], before)
    bnet = _net(torch.float64)
    dict(bnet.named_parameters())[frozen].requires_grad_(False)
    bnet.bptt_backward(x, y, T1=10)
    assert dict(bnet.named_parameters())[frozen].grad is None


def test_beta_rule_warns_near_the_dtype_precision():
    """The rule: warn below BETA_EPS_WARNING machine epsilons of the dtype; refuse a beta (or
    1/(2 beta N)) outside the dtype's normal range."""
    eps32 = torch.finfo(torch.float32).eps
    with pytest.warns(RuntimeWarning, match="rounding of the states dominates"):
        check_beta(0.5 * BETA_EPS_WARNING * eps32, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_beta(2 * BETA_EPS_WARNING * eps32, torch.float32)
        check_beta(1e-10, torch.float64)  # fine in float64, warned in float32:
    with pytest.warns(RuntimeWarning):
        check_beta(1e-10, torch.float32)
    with pytest.raises(ValueError, match="out of range"):
        check_beta(1e-38, torch.float32, batch=1000)  # 1/(2 beta N) fine, beta itself denormal
    with pytest.raises(ValueError, match="out of range"):
        check_beta(1e38, torch.float32, batch=1)  # beta fine, 1/(2 beta) denormal


def test_beta_1e_minus_30_in_float32_warns_instead_of_silent_noise():
    net, (x, y) = _net(), _xy()
    with pytest.warns(RuntimeWarning, match="beta=1e-30 is below"):
        net.ep_backward(x, y, beta=1e-30, T1=3, T2=2)


def test_replacing_a_layer_rebuilds_the_plan():
    """The plan cache keys on the layers' geometry: replacing a layer (other channels, other
    padding or pool) and the readout after a first call relaxes the new network."""
    net, (x, y) = _net(), _xy()
    net(x)
    net.layers[1] = EPConv2d(5, 4, 3, padding=0, pool=1)
    net.readout = nn.Linear(4 * 2 * 2, 10)
    out = net(x)
    assert out.shape == (3, 10)
    net.layers[1].pool = 2
    net.readout = nn.Linear(4, 10)
    net.ep_backward(x, y, T1=4, T2=2)
    assert net.layers[1].weight.grad is not None
