"""The Triton backend (``ep_kernels.triton``) against the plain-torch references.

Without a GPU the kernels run under the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set below and in conftest.py before ``ep_kernels.triton`` is first
imported); with one they run on CUDA tensors. Same shape spread as tests/test_ops.py: odd
sizes, padding 0/1/2, kernels 3, 5 and rectangular, batch 1, channel counts that are not
multiples of 8, stride and dilation 2, groups 2, pool 1/2/3 on sizes not divisible by the
pool, non-contiguous inputs; float32 and float64, and bfloat16 (computed in float32).
A subprocess also compiles every kernel variant for sm_90 with Triton's own compiler.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ep_kernels.ops as ops  # noqa: E402
from ep_kernels import _backend, use_backend  # noqa: E402
from ep_kernels.testing import RTOL  # noqa: E402
from ep_kernels.testing import grads, make_batch, small_net  # noqa: E402
from ep_kernels.testing import (CASE_IDS, CONV_CASES, assert_close_scaled, conv_setup, noncontiguous, rand,  # noqa: E402
                      random_state, check_contrastive_conv_grad, check_conv_pool_drive, check_pool_conv_transpose,
                      check_state_update, check_state_update_noncontiguous)

# No skip without triton: it is a test dependency (setup.py's "test" extra), so its absence
# must fail here rather than pass unnoticed.

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _one_thread_triton():
    """Tiny tensors: one thread; the interpreter must be the one defining the kernels; on a GPU,
    no TF32 (the Triton kernels follow torch.backends.cudnn.allow_tf32, as torch's convolutions)."""
    old = torch.get_num_threads(), torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if DEV == "cpu":
        assert _backend.triton_interpreting(), "TRITON_INTERPRET=1 must be set before ep_kernels.triton is imported"
    yield
    torch.set_num_threads(old[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old[1:]


def _dev(*ts):
    out = tuple(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in ts)
    return out if len(out) > 1 else out[0]


# --------------------------------------------------------------------------------------------
# conv_pool_drive
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv_pool_drive(case, layout, dtype, gen):
    check_conv_pool_drive("triton", DEV, dtype, case, gen, layout)


@pytest.mark.parametrize("pool", [2, 3])
def test_conv_pool_drive_ties_and_nan(pool, dtype, gen):
    """Exact ties (zero input + bias; small-integer convolutions) go to the first position of
    the window, and NaN wins, as in max_pool2d."""
    n, cin, cout, h, w = 2, 3, 5, 9, 10
    weight = rand(gen, cout, cin, 3, 3, dtype=dtype, lo=-1, hi=1)
    bias = rand(gen, cout, dtype=dtype, lo=-1, hi=1)
    x = torch.zeros(n, cin, h, w, dtype=dtype)
    x[1, :, 4, 5] = 1.0
    xi = torch.randint(0, 2, (n, cin, h, w), generator=gen).to(dtype)
    wi = torch.randint(-1, 2, (cout, cin, 3, 3), generator=gen).to(dtype)
    xn = rand(gen, n, cin, h, w, dtype=dtype)
    xn[0, 1, 4, 4] = float("nan")
    for xx, ww in ((x, weight), (xi, wi), (xn, weight)):
        xx, ww, b = _dev(xx, ww, bias)
        with use_backend("triton"):
            d, i = ops.conv_pool_drive(xx, ww, b, padding=1, pool=pool)
        rd, ri = ops.conv_pool_drive_ref(xx, ww, b, [1, 1], [1, 1], [1, 1], 1, pool)
        torch.testing.assert_close(d, rd, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(i, ri)


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pool", [2, 3])
def test_pool_argmax_fused_bias(pool, dt, gen):
    """The epilogue with the bias fused (the CUDA path): max_pool2d(y + bias), ties included
    (16-bit values are compared as stored, after rounding)."""
    from ep_kernels.triton import pool_argmax

    y = rand(gen, 2, 5, 10, 11, dtype=torch.float32, lo=-1, hi=1).to(dt)
    y[0, 0] = 0.25  # a constant plane: ties everywhere
    y[1, 2, 3, 4] = float("nan")
    b = rand(gen, 5, dtype=torch.float32, lo=-1, hi=1).to(dt)
    y, b = _dev(y, b)
    out, idx = pool_argmax(y, b, pool)
    ref_in = (y.float() + b.float()[:, None, None]).to(dt)
    rout, ridx = F.max_pool2d(ref_in, pool, pool, return_indices=True)
    torch.testing.assert_close(out, rout, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, ridx)
    out, idx = pool_argmax(y, None, pool)
    rout, ridx = F.max_pool2d(y, pool, pool, return_indices=True)
    torch.testing.assert_close(out, rout, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, ridx)


# --------------------------------------------------------------------------------------------
# pool_conv_transpose
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_pool_conv_transpose(case, layout, dtype, gen):
    check_pool_conv_transpose("triton", DEV, dtype, case, gen, layout)


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], (2, 70, 100, 6, 7, 3, 1, 1, 1, 1, 2),
                                  (1, 40, 90, 7, 6, 5, 2, 1, 1, 2, 2)],
                         ids=["case0", "case2", "many_channels", "many_channels_k5_groups2"])
def test_pool_conv_transpose_real_argmax(case, dtype, gen):
    """Indices from the drive itself (the engine's use); several channel blocks per tile."""
    x, weight, bias, conv, pool, (hc, wc) = conv_setup(case, dtype, gen)
    _, idx = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    s = random_state(gen, idx.shape, dtype)
    s, idx, weight = _dev(s, idx, weight)
    args = (list(x.shape[2:]), [hc, wc])
    with use_backend("triton"):
        out = ops.pool_conv_transpose(s, idx, weight, *args, pool=pool, **conv)
    ref = ops.pool_conv_transpose_ref(s, idx, weight, *args, pool=pool, **conv)
    scale = ops.pool_conv_transpose_ref(s.abs(), idx, weight.abs(), *args, pool=pool, **conv)
    assert_close_scaled(out, ref, scale, RTOL[dtype])


# --------------------------------------------------------------------------------------------
# state_update
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (4, 13), (2, 16, 9, 9)])
@pytest.mark.parametrize("gain", [1.0, 0.3])
@pytest.mark.parametrize("parts", ["all", "no_top_down", "no_nudge", "drive_only"])
def test_state_update(shape, gain, parts, dtype, gen):
    check_state_update("triton", DEV, dtype, shape, gain, parts, gen)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_state_update_noncontiguous_and_nan(layout, dtype, gen):
    shape = (2, 5, 6, 7)
    drive, td, nudge, prev = check_state_update_noncontiguous("triton", DEV, dtype, layout, gen)
    # NaN in any operand propagates to the state and to the change
    for k in range(4):
        ts = [t.clone() for t in (drive, td, nudge, prev)]
        ts[k][1, 2, 3, 4] = float("nan")
        o = torch.empty(shape, dtype=dtype, device=DEV)
        with use_backend("triton"):
            ch = ops.state_update(ts[0], ts[1], ts[2], ts[3], 1.0, o)
        assert ch.isnan(), k
        assert o.isnan().sum() == (0 if k == 3 else 1)


# --------------------------------------------------------------------------------------------
# contrastive_conv_grad
# --------------------------------------------------------------------------------------------

# Every case in both layouts, plus one many-channel case (contiguous only: the layouts are
# covered by the smaller cases, and the interpreter is slow).
CONTRASTIVE_PARAMS = ([pytest.param(c, lay, id=f"{i}-{lay}") for c, i in zip(CONV_CASES, CASE_IDS)
                       for lay in ("contiguous", "transposed")]
                      + [pytest.param((3, 70, 24, 6, 7, 3, 1, 1, 1, 1, 2), "contiguous", id="many_channels-contiguous")])


@pytest.mark.parametrize("case,layout", CONTRASTIVE_PARAMS)
def test_contrastive_conv_grad(case, layout, dtype, gen):
    check_contrastive_conv_grad("triton", DEV, dtype, case, gen, layout)


def test_contrastive_conv_grad_noncontiguous_grad(gen):
    x, weight, bias, conv, pool, (hc, wc) = conv_setup(CONV_CASES[0], torch.float64, gen)
    s, idx = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    x, s, idx = _dev(x, s, idx)
    gw = _dev(noncontiguous(torch.zeros_like(weight), "transposed"))
    gw_ref = torch.zeros_like(gw)
    args = (x, s, idx, x.flip(0), s.flip(0), idx.flip(0), [hc, wc], conv["stride"], conv["padding"],
            conv["dilation"], conv["groups"], pool, -0.5)
    with use_backend("triton"):
        ops.contrastive_conv_grad(*args, gw, None)
    ops.contrastive_conv_grad_ref(*args, gw_ref, None)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# bfloat16: loaded as bf16, computed in float32
# --------------------------------------------------------------------------------------------

def test_bf16_ops_computed_in_float32(gen):
    case = CONV_CASES[0]
    x, weight, bias, conv, pool, (hc, wc) = conv_setup(case, torch.float32, gen)
    xb, wb, bb = (t.to(torch.bfloat16) for t in (x, weight, bias))
    xb, wb, bb = _dev(xb, wb, bb)
    with use_backend("triton"):
        d, i = ops.conv_pool_drive(xb, wb, bb, pool=pool, **conv)
    rd, ri = ops.conv_pool_drive_ref(xb, wb, bb, pool=pool, **conv)
    assert d.dtype == torch.bfloat16 and torch.equal(d, rd) and torch.equal(i, ri)
    # top-down and contrastive: against the float32 computation from the same bf16 values
    s = random_state(gen, rd.shape, torch.float32).to(torch.bfloat16)
    s = _dev(s)
    args = (list(x.shape[2:]), [hc, wc])
    with use_backend("triton"):
        td = ops.pool_conv_transpose(s, i, wb, *args, pool=pool, **conv)
    ref = ops.pool_conv_transpose_ref(s.float(), i, wb.float(), *args, pool=pool, **conv)
    assert td.dtype == torch.bfloat16
    torch.testing.assert_close(td.float(), ref, rtol=1e-2, atol=1e-2)
    gw = torch.zeros_like(wb)
    cargs = (xb, s, i, xb.flip(0), s.flip(0), i.flip(0), [hc, wc], conv["stride"], conv["padding"],
             conv["dilation"], conv["groups"], pool, -0.5)
    with use_backend("triton"):
        ops.contrastive_conv_grad(*cargs, gw, None)
    gw_ref = torch.zeros_like(weight, device=DEV)
    ops.contrastive_conv_grad_ref(*(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                    for t in cargs), gw_ref, None)
    torch.testing.assert_close(gw.float(), gw_ref, rtol=2e-2, atol=2e-2)
    # state update: one rounding at the store
    dr, tdr, pr = (_dev(rand(gen, 3, 7, 5, dtype=torch.float32, lo=-1, hi=2).to(torch.bfloat16)) for _ in range(3))
    out = torch.empty_like(dr)
    with use_backend("triton"):
        ch = ops.state_update(dr, tdr, None, pr, 0.5, out)
    ref = torch.clamp((dr.float() + tdr.float()) * 0.5, 0, 1).to(torch.bfloat16)
    assert torch.equal(out, ref)
    assert ch.dtype == torch.bfloat16 and ch == (out.float() - pr.float()).abs().max().to(torch.bfloat16)


# --------------------------------------------------------------------------------------------
# backend selection and the network on the triton backend
# --------------------------------------------------------------------------------------------

def test_backend_routes_to_triton(monkeypatch):
    from ep_kernels.ops import _library

    calls = []
    real = _library.triton_op
    monkeypatch.setattr(_library, "triton_op", lambda name: (calls.append(name), real(name))[1])
    d = _dev(torch.rand(2, 3))
    with use_backend("triton"):
        ops.state_update(d, None, None, None, 1.0, torch.empty_like(d))
    assert calls == ["state_update"]
    monkeypatch.setenv("EP_KERNELS_BACKEND", "triton")
    ops.state_update(d, None, None, d.clone(), 1.0, torch.empty_like(d))
    assert calls == ["state_update"] * 2
    assert "triton" in _backend.available_backends()


def test_triton_ops_are_torch_ops_with_the_compiled_schemas_and_autograd(gen):
    """The Triton kernels are registered as ``torch.ops.ep_kernels_triton.*`` with the compiled
    ops' schemas, fake kernels (opcheck) and autograd formulas: the drive and the top-down are
    differentiable on this backend too, with the reference's gradients."""
    from ep_kernels.ops import _library

    ops.load_compiled()
    for name in _library.SCHEMAS:
        a = str(getattr(torch.ops.ep_kernels, name).default._schema).split("::", 1)[1]
        b = str(_library.triton_op(name).default._schema).split("::", 1)[1]
        assert a == b, (a, b)
    x, weight, bias, conv, pool, (hc, wc) = conv_setup(CONV_CASES[0], torch.float64, gen)
    grads_by = {}
    for backend in ("reference", "triton"):
        leaves = [_dev(t.clone()).requires_grad_() for t in (x, weight, bias)]
        with use_backend(backend):
            d, idx = ops.conv_pool_drive(*leaves, pool=pool, **conv)
            td = ops.pool_conv_transpose(d, idx, leaves[1], list(x.shape[2:]), [hc, wc], pool=pool, **conv)
        (d.square().sum() + (td * leaves[0]).sum()).backward()
        grads_by[backend] = [t.grad for t in leaves]
    for a, b in zip(grads_by["triton"], grads_by["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    T = torch.ops.ep_kernels_triton
    xs, ws, bs = (_dev(t) for t in (x, weight, bias))
    c = [conv["stride"], conv["padding"], conv["dilation"], conv["groups"]]
    torch.library.opcheck(T.conv_pool_drive, (xs, ws, bs, *c, pool))
    s = _dev(random_state(gen, (x.shape[0], weight.shape[0], hc // pool, wc // pool), torch.float64))
    _, i = ops.conv_pool_drive_ref(xs, ws, bs, pool=pool, **conv)
    torch.library.opcheck(T.pool_conv_transpose, (s, i, ws, list(x.shape[2:]), [hc, wc], *c, pool))
    torch.library.opcheck(T.state_update, (s, s.flip(0), None, s.flip(1), 0.5, torch.empty_like(s)))
    torch.library.opcheck(T.contrastive_conv_grad, (xs, s, i, xs.flip(0), s.flip(0), i.flip(0), [hc, wc], *c, pool,
                                                    -0.5, torch.zeros_like(ws), torch.zeros_like(bs)))


@pytest.mark.skipif(DEV != "cpu", reason="the interpreter case")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    d = torch.rand(2, 3)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.state_update(d, None, None, None, 1.0, torch.empty_like(d))


@pytest.mark.parametrize("kind", ["conv_pool", "conv_nopool", "mixed"])
def test_network_on_triton_matches_reference(kind):
    """A small EPNetwork: free phase and EP gradients, backend triton against reference."""
    net = small_net(kind, torch.float64, seed=3, activation="hardsigmoid").to(DEV)
    x, y = make_batch(n=3, dtype=torch.float64, seed=4)
    x, y = _dev(x, y)
    res = {}
    for backend in ("reference", "triton"):
        with use_backend(backend):
            net.zero_grad(set_to_none=True)
            r = net.ep_backward(x, y, beta=0.2, T1=6, T2=2, keep_states=True)
            res[backend] = (r.states, grads(net))
    (states_ref, g_ref), (states, g) = res["reference"], res["triton"]
    for phase in ("free", "plus", "minus"):
        for s, r in zip(states[phase], states_ref[phase]):
            torch.testing.assert_close(s, r, rtol=0, atol=1e-12)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-9, atol=1e-12, msg=name)


# --------------------------------------------------------------------------------------------
# the kernels compile for the GPU (Triton's compiler, sm_90), without one
# --------------------------------------------------------------------------------------------

def test_kernels_compile_for_sm90():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "ep_kernels.triton.compile_check", "--arch", "90"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert " 0 failed" in r.stdout
