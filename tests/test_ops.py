"""The four EP ops: compiled 'cpu' backend against the plain-torch references, opcheck,
and backend selection (the errors bad input gets: tests/test_op_errors.py).

Inputs are fresh random values from seeded generators (never zeros) over a spread of shapes:
odd sizes, padding 0/1/2, kernels 3 and 5 (and rectangular), batch 1, channel counts that are
not multiples of 8, stride and dilation 2, groups 2, pool 1/2/3 on sizes not divisible by the
pool, non-contiguous (transposed / sliced) inputs; float32 and float64.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ep_kernels
import ep_kernels.ops as ops
from ep_kernels import _backend, use_backend
from ep_kernels.ops import _library
from ep_kernels.testing import RTOL
from ep_kernels.testing import (CASE_IDS, CONV_CASES, assert_close_scaled, conv_setup, rand, random_state,
                      check_contrastive_conv_grad, check_conv_pool_drive, check_pool_conv_transpose,
                      check_state_update, check_state_update_noncontiguous)

# No skip when the extension is missing: it is part of the install, so its absence must fail
# here (with the loader's reason), not pass unnoticed.
ops.load_compiled()
C = torch.ops.ep_kernels

# --------------------------------------------------------------------------------------------
# conv_pool_drive
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv_pool_drive_matches_ref(case, layout, dtype, gen):
    check_conv_pool_drive("cpu", "cpu", dtype, case, gen, layout)


def test_conv_pool_drive_no_bias(gen):
    x, weight, _, conv, pool, _ = conv_setup(CONV_CASES[0], torch.float64, gen)
    with use_backend("cpu"):
        d, i = ops.conv_pool_drive(x, weight, None, pool=pool, **conv)
    rd, ri = ops.conv_pool_drive_ref(x, weight, None, pool=pool, **conv)
    torch.testing.assert_close(d, rd, rtol=1e-12, atol=0)
    assert torch.equal(i, ri)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_conv_pool_drive_low_precision_geometry_that_crashed_onednn(backend, dt, gen):
    """torch 2.13's oneDNN bfloat16 convolution segfaulted on an AMX CPU for this geometry (the
    sanitizer's fuzz case; a 1-row input, stride 2, dilation 2): the drive now computes
    low-precision convolutions in float32 and rounds once. Checked against float64."""
    x = rand(gen, 1, 12, 3, 6, dtype=torch.float64, lo=-1)
    weight = rand(gen, 30, 4, 3, 2, dtype=torch.float64, lo=-1)
    bias = rand(gen, 30, dtype=torch.float64, lo=-1)
    conv = dict(stride=2, padding=(3, 1), dilation=2, groups=3)
    for h in (1, 3):  # the crashing 1-row input, and one whose output is not all padding
        xl, wl, bl = x[:, :, :h].to(dt), weight.to(dt), bias.to(dt)
        with use_backend(backend):
            d, _ = ops.conv_pool_drive(xl, wl, bl, pool=1, **conv)
        ref, _ = ops.conv_pool_drive_ref(xl.double(), wl.double(), bl.double(), pool=1, **conv)
        assert d.dtype == dt
        # float32 accumulation, one rounding to dt: within a few ulps of dt at the result's scale
        eps = torch.finfo(dt).eps
        assert float((d.double() - ref).abs().max()) <= 2 * eps * float(ref.abs().max()) + 1e-6


@pytest.mark.parametrize("pool", [2, 3])
def test_conv_pool_drive_ties_like_max_pool2d(pool, dtype, gen):
    """Exact ties: zero input + bias (every window position holds the bias, as at the first
    step from zero states), and small-integer convolutions (exact arithmetic, many ties)."""
    n, cin, cout, h, w = 2, 3, 5, 9, 10
    weight = rand(gen, cout, cin, 3, 3, dtype=dtype, lo=-1, hi=1)
    bias = rand(gen, cout, dtype=dtype, lo=-1, hi=1)
    x = torch.zeros(n, cin, h, w, dtype=dtype)
    x[1, :, 4, 5] = 1.0  # one image with a bump: ties only away from it
    for xx, ww in ((x, weight), (torch.randint(0, 2, (n, cin, h, w), generator=gen).to(dtype),
                                 torch.randint(-1, 2, (cout, cin, 3, 3), generator=gen).to(dtype))):
        with use_backend("cpu"):
            d, i = ops.conv_pool_drive(xx, ww, bias, padding=1, pool=pool)
        rd, ri = ops.conv_pool_drive_ref(xx, ww, bias, [1, 1], [1, 1], [1, 1], 1, pool)
        assert torch.equal(d, rd)
        assert torch.equal(i, ri)
    # zero input: the winner is the first position of every window
    with use_backend("cpu"):
        _, i = ops.conv_pool_drive(torch.zeros(1, cin, h, w, dtype=dtype), weight, bias, padding=1, pool=pool)
    hp, wp = h // pool, w // pool
    first = (torch.arange(hp).view(hp, 1) * pool * w + torch.arange(wp).view(1, wp) * pool).expand(cout, hp, wp)
    assert torch.equal(i[0], first)


def test_conv_pool_drive_nan_like_max_pool2d(gen):
    x, weight, bias, conv, pool, _ = conv_setup(CONV_CASES[0], torch.float32, gen)
    x[0, 1, 4, 4] = float("nan")
    with use_backend("cpu"):
        d, i = ops.conv_pool_drive(x, weight, bias, pool=pool, **conv)
    rd, ri = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    assert d.isnan().any()
    torch.testing.assert_close(d, rd, equal_nan=True, rtol=1e-5, atol=0)
    assert torch.equal(i, ri)


# --------------------------------------------------------------------------------------------
# pool_conv_transpose
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_pool_conv_transpose_matches_ref(case, layout, dtype, gen):
    check_pool_conv_transpose("cpu", "cpu", dtype, case, gen, layout)


@pytest.mark.parametrize("case", CONV_CASES[:3] + [(2, 70, 100, 6, 7, 3, 1, 1, 1, 1, 2), (1, 40, 90, 7, 6, 5, 2, 1, 1, 2, 2)],
                         ids=CASE_IDS[:3] + ["many_channels", "many_channels_k5_groups2"])
def test_pool_conv_transpose_with_real_argmax(case, dtype, gen):
    """Indices from the drive itself (the engine's use), both backends end to end; the last
    cases have several output-channel blocks and input-channel chunks in the sparse kernel."""
    x, weight, bias, conv, pool, (hc, wc) = conv_setup(case, dtype, gen)
    _, idx = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    s = random_state(gen, (x.shape[0], weight.shape[0], hc // pool, wc // pool), dtype)
    args = (list(x.shape[2:]), [hc, wc])
    with use_backend("cpu"):
        out = ops.pool_conv_transpose(s, idx, weight, *args, pool=pool, **conv)
    with use_backend("reference"):
        ref = ops.pool_conv_transpose(s, idx, weight, *args, pool=pool, **conv)
    scale = ops.pool_conv_transpose_ref(s.abs(), idx, weight.abs(), *args, pool=pool, **conv)
    assert_close_scaled(out, ref, scale, RTOL[dtype])


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[5], CONV_CASES[7], (2, 70, 30, 6, 7, 3, 1, 1, 1, 1, 2)],
                         ids=["case0", "case5_groups", "case7_rect", "many_channels"])
def test_pool_conv_transpose_packing_follows_the_weight(case, dtype, gen):
    """The compiled kernel keeps its packing of a weight across calls and makes a new one
    whenever the weight's bytes change: in place (an optimizer step), through ``.data``
    (which no version counter sees, as gradcheck's finite differences do), or another tensor."""
    x, weight, bias, conv, pool, (hc, wc) = conv_setup(case, dtype, gen)
    _, idx = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    s = random_state(gen, idx.shape, dtype)
    sizes = (list(x.shape[2:]), [hc, wc])

    def check(w):
        with use_backend("cpu"):
            out = ops.pool_conv_transpose(s, idx, w, *sizes, pool=pool, **conv)
        ref = ops.pool_conv_transpose_ref(s, idx, w, *sizes, pool=pool, **conv)
        scale = ops.pool_conv_transpose_ref(s.abs(), idx, w.abs(), *sizes, pool=pool, **conv)
        assert_close_scaled(out, ref, scale, RTOL[dtype])
        return out

    first = check(weight)
    assert torch.equal(check(weight), first)  # the kept packing
    with torch.no_grad():
        weight.mul_(-0.5).add_(0.01)  # in place: the version counter moves
    check(weight)
    weight.data[0, 0, 0, 0] += 1.0  # through .data: only the bytes tell
    check(weight)
    check(weight.clone() * 0.3)  # another tensor
    check(weight.transpose(2, 3).contiguous().transpose(2, 3))  # other strides, same values
    with torch.inference_mode():
        w_inf = weight * 1.5
    check(w_inf)


def test_results_do_not_depend_on_thread_count(gen):
    """Each task owns its output slice / partial sums in a fixed order: bitwise reproducible."""
    x, weight, bias, conv, pool, (hc, wc) = conv_setup((4, 20, 40, 8, 9, 3, 1, 1, 1, 1, 2), torch.float32, gen)
    _, idx = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    s = random_state(gen, idx.shape, torch.float32)
    x_b = rand(gen, *x.shape, dtype=torch.float32)
    c = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"], pool, -0.5)
    results = []
    old = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            with use_backend("cpu"):
                td = ops.pool_conv_transpose(s, idx, weight, list(x.shape[2:]), [hc, wc], pool=pool, **conv)
                gw = torch.zeros_like(weight)
                ops.contrastive_conv_grad(x, s, idx, x_b, s.flip(0), idx.flip(0), [hc, wc], *c, gw, None)
                out = torch.empty_like(td)
                ch = ops.state_update(td, td, None, x, 0.5, out)
            results.append((td, gw, out, ch))
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))


_ISA_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    import ep_kernels.ops as ops
    from ep_kernels import use_backend
    g = torch.Generator().manual_seed(5)
    for dt, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        for (cin, cout, k, pad, pool) in ((5, 9, 3, 1, 2), (40, 20, 5, 2, 3), (3, 70, 3, 0, 2)):
            x = torch.rand(3, cin, 11, 10, generator=g, dtype=dt)
            xb = torch.rand(3, cin, 11, 10, generator=g, dtype=dt)
            w = torch.rand(cout, cin, k, k, generator=g, dtype=dt) - 0.5
            b = torch.rand(cout, generator=g, dtype=dt)
            x[0, 0, 0, 0] = float("nan")
            with use_backend("cpu"):
                d, i = ops.conv_pool_drive(x, w, b, padding=pad, pool=pool)
            rd, ri = ops.conv_pool_drive_ref(x, w, b, 1, pad, 1, 1, pool)
            assert torch.equal(i, ri) and torch.allclose(d, rd, equal_nan=True)
            x[0, 0, 0, 0] = 0.5
            d, i = ops.conv_pool_drive_ref(x, w, b, 1, pad, 1, 1, pool)
            hc = [11 + 2 * pad - k + 1, 10 + 2 * pad - k + 1]
            s = torch.rand(d.shape, generator=g, dtype=dt).masked_fill(torch.rand(d.shape, generator=g) < 0.3, 0)
            with use_backend("cpu"):
                td = ops.pool_conv_transpose(s, i, w, [11, 10], hc, padding=pad, pool=pool)
                gw = torch.zeros_like(w)
                ops.contrastive_conv_grad(x, s, i, xb, s.flip(0), i.flip(0), hc, 1, pad, 1, 1, pool, -0.5, gw)
                out = torch.empty_like(td)
                ch = ops.state_update(td, td, None, x, 0.5, out)
            rtd = ops.pool_conv_transpose_ref(s, i, w, [11, 10], hc, 1, pad, 1, 1, pool)
            rgw = torch.zeros_like(w)
            ops.contrastive_conv_grad_ref(x, s, i, xb, s.flip(0), i.flip(0), hc, 1, pad, 1, 1, pool, -0.5, rgw, None)
            rout = torch.empty_like(td)
            rch = ops.state_update_ref(td, td, None, x, 0.5, rout)
            assert torch.allclose(td, rtd, rtol=tol, atol=tol), (td - rtd).abs().max()
            assert torch.allclose(gw, rgw, rtol=tol, atol=tol * 10), (gw - rgw).abs().max()
            assert torch.equal(out, rout) and torch.equal(ch, rch)
    print("ISA-OK")
""")


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_lower_isa_code_paths(isa):
    """The AVX2 and baseline builds of the vector kernels (chosen at run time; forced here by
    EP_KERNELS_ISA, which can only lower the level) agree with the references too."""
    env = dict(os.environ, EP_KERNELS_ISA=isa, OMP_NUM_THREADS="1")
    env.pop("EP_KERNELS_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ISA-OK" in r.stdout, r.stdout + r.stderr


def test_pool_conv_transpose_index_outside_window(gen):
    """The sparse kernel needs max-pool indices (each inside its own window); others are refused."""
    x, weight, bias, conv, pool, (hc, wc) = conv_setup(CONV_CASES[0], torch.float32, gen)
    _, idx = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    s = random_state(gen, idx.shape, torch.float32)
    bad = idx.clone()
    bad[1, 2, 1, 1] = idx[1, 2, 1, 2]  # a valid plane position, but in the neighbouring window
    with use_backend("cpu"), pytest.raises(ValueError, match=r"indices\[1, 2, 1, 1\] .* outside its 2x2"):
        ops.pool_conv_transpose(s, bad, weight, list(x.shape[2:]), [hc, wc], pool=pool, **conv)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_pool_conv_transpose_low_precision_dense_path(dt, gen):
    """bf16/fp16 take the dense ATen path: the same calls as the reference."""
    x, weight, bias, conv, pool, (hc, wc) = conv_setup(CONV_CASES[0], torch.float32, gen)
    _, idx = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    s = random_state(gen, idx.shape, torch.float32).to(dt)
    w = weight.to(dt)
    with use_backend("cpu"):
        out = ops.pool_conv_transpose(s, idx, w, list(x.shape[2:]), [hc, wc], pool=pool, **conv)
    ref = ops.pool_conv_transpose_ref(s, idx, w, list(x.shape[2:]), [hc, wc], pool=pool, **conv)
    torch.testing.assert_close(out, ref)


def test_pool_conv_transpose_is_the_gradient_of_phi(gen):
    """W^T U(s) = d<s, P(W*x + b)>/dx with the argmax fixed (docs/design.md, "The state update")."""
    x, weight, bias, conv, pool, (hc, wc) = conv_setup(CONV_CASES[0], torch.float64, gen)
    x.requires_grad_(True)
    d, idx = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    s = random_state(gen, d.shape, torch.float64)
    (g,) = torch.autograd.grad((s * d).sum(), x)
    with use_backend("cpu"):
        td = ops.pool_conv_transpose(s, idx, weight, list(x.shape[2:]), [hc, wc], pool=pool, **conv)
    torch.testing.assert_close(td, g, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# state_update
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (4, 13), (2, 128, 16, 16)])
@pytest.mark.parametrize("gain", [1.0, 0.3])
@pytest.mark.parametrize("parts", ["all", "no_top_down", "no_nudge", "drive_only"])
def test_state_update_matches_ref(shape, gain, parts, dtype, gen):
    check_state_update("cpu", "cpu", dtype, shape, gain, parts, gen)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_state_update_noncontiguous(layout, dtype, gen):
    check_state_update_noncontiguous("cpu", "cpu", dtype, layout, gen)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_state_update_propagates_nan(backend, dtype, gen):
    shape = (3, 4, 5, 5)
    drive = rand(gen, *shape, dtype=dtype, lo=-1, hi=2)
    drive[1, 2, 3, 4] = float("nan")
    prev = rand(gen, *shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    with use_backend(backend):
        ch = ops.state_update(drive, None, None, prev, 1.0, out)
    assert out[1, 2, 3, 4].isnan() and out.isnan().sum() == 1
    assert ch.isnan()
    # NaN in the top-down or the nudge propagates the same way; so does one in prev
    for kw in ("td", "nudge", "prev"):
        d = rand(gen, *shape, dtype=dtype)
        extra = rand(gen, *shape, dtype=dtype)
        extra[0, 0, 0, 0] = float("nan")
        args = dict(td=None, nudge=None, prev=rand(gen, *shape, dtype=dtype))
        args[kw] = extra
        with use_backend(backend):
            ch = ops.state_update(d, args["td"], args["nudge"], args["prev"], 1.0, out)
        assert ch.isnan(), kw


# --------------------------------------------------------------------------------------------
# contrastive_conv_grad
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("case", CONV_CASES + [(3, 70, 24, 6, 7, 3, 1, 1, 1, 1, 2)], ids=CASE_IDS + ["many_channels"])
def test_contrastive_conv_grad_matches_ref(case, layout, dtype, gen):
    check_contrastive_conv_grad("cpu", "cpu", dtype, case, gen, layout)


@pytest.mark.parametrize("where", ["live", "zero_state"])
def test_contrastive_conv_grad_index_outside_window(where, gen):
    """Every index is checked, also where the state is 0 (the kernel skips those positions
    in its sums, but an index outside its window is a wrong input there too)."""
    x, weight, bias, conv, pool, (hc, wc) = conv_setup(CONV_CASES[0], torch.float32, gen)
    s, idx = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    s_b = s.flip(0).clone()
    bad = idx.flip(0).clone()
    bad[0, 1, 2, 2] = bad[0, 1, 2, 3]
    if where == "zero_state":
        s_b[0, 1, 2, 2] = 0.0
    gw, gb = torch.ones_like(weight), torch.ones_like(bias)
    args = (x, s, idx, x.flip(0), s_b, bad, [hc, wc], conv["stride"], conv["padding"], conv["dilation"],
            conv["groups"], pool, -0.5, gw, gb)
    with use_backend("cpu"), pytest.raises(ValueError, match=r"idx_b\[0, 1, 2, 2\] = .* outside its 2x2 pooling window"):
        ops.contrastive_conv_grad(*args)
    assert (gw == 1).all() and (gb == 1).all()  # nothing written on error


@pytest.mark.parametrize("dt", [torch.bfloat16])
def test_contrastive_conv_grad_low_precision_dense_path(dt, gen):
    x, weight, bias, conv, pool, (hc, wc) = conv_setup(CONV_CASES[0], torch.float32, gen)
    s, idx = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    x, s = x.to(dt), random_state(gen, s.shape, torch.float32).to(dt)
    gw, gw_ref = torch.zeros_like(weight, dtype=dt), torch.zeros_like(weight, dtype=dt)
    args = (x, s, idx, x.flip(0), s.flip(0), idx.flip(0), [hc, wc], conv["stride"], conv["padding"],
            conv["dilation"], conv["groups"], pool, -0.5)
    with use_backend("cpu"):
        ops.contrastive_conv_grad(*args, gw, None)
    ops.contrastive_conv_grad_ref(*args, gw_ref, None)
    torch.testing.assert_close(gw, gw_ref)


# --------------------------------------------------------------------------------------------
# opcheck, fake tensors, autograd of the compiled ops
# --------------------------------------------------------------------------------------------

def _small_conv_args(gen, dtype=torch.float64, pool=2):
    x, weight, bias, conv, pool, (hc, wc) = conv_setup((2, 3, 4, 7, 6, 3, 1, 1, 1, 1, pool), dtype, gen)
    c = [conv["stride"], conv["padding"], conv["dilation"], conv["groups"]]
    return x, weight, bias, c, pool, [hc, wc]


@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_conv_pool_drive(pool, requires_grad, gen):
    x, weight, bias, c, pool, _ = _small_conv_args(gen, pool=pool)
    if requires_grad:
        x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    torch.library.opcheck(C.conv_pool_drive, (x, weight, bias, *c, pool))
    torch.library.opcheck(C.conv_pool_drive, (x, weight, None, *c, pool))


@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_pool_conv_transpose(pool, requires_grad, gen):
    x, weight, bias, c, pool, hw = _small_conv_args(gen, pool=pool)
    _, idx = ops.conv_pool_drive_ref(x, weight, bias, *c, pool)
    s = random_state(gen, (x.shape[0], weight.shape[0], hw[0] // pool, hw[1] // pool), torch.float64)
    if requires_grad:
        s, weight = s.requires_grad_(), weight.requires_grad_()
    torch.library.opcheck(C.pool_conv_transpose, (s, idx, weight, list(x.shape[2:]), hw, *c, pool))


def test_opcheck_state_update(gen):
    shape = (2, 3, 4, 5)
    d, t, g, p = (rand(gen, *shape, dtype=torch.float64, lo=-1, hi=2) for _ in range(4))
    for args in ((d, t, g, p), (d, None, None, None), (d, t, None, p)):
        torch.library.opcheck(C.state_update, (*args, 0.5, torch.empty(shape, dtype=torch.float64)))


@pytest.mark.parametrize("pool", [1, 2])
def test_opcheck_contrastive_conv_grad(pool, gen):
    x, weight, bias, c, pool, hw = _small_conv_args(gen, pool=pool)
    _, idx = ops.conv_pool_drive_ref(x, weight, bias, *c, pool)
    sp = (x.shape[0], weight.shape[0], hw[0] // pool, hw[1] // pool)
    s_a, s_b = random_state(gen, sp, torch.float64), random_state(gen, sp, torch.float64)
    for gb in (torch.zeros_like(bias), None):
        torch.library.opcheck(C.contrastive_conv_grad,
                              (x, s_a, idx, x.flip(0), s_b, idx, hw, *c, pool, -0.5, torch.zeros_like(weight), gb))


def test_fake_tensor_shapes(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, weight, bias, c, pool, hw = _small_conv_args(gen, pool=2)
    with FakeTensorMode() as mode:
        fx, fw, fb = (mode.from_tensor(t) for t in (x, weight, bias))
        d, i = C.conv_pool_drive(fx, fw, fb, *c, pool)
        assert d.shape == (2, 4, 3, 3) and i.dtype == torch.int64 and i.shape == d.shape
        td = C.pool_conv_transpose(d, i, fw, list(x.shape[2:]), hw, *c, pool)
        assert td.shape == x.shape


def test_compiled_ops_autograd_matches_reference(gen):
    """conv_pool_drive and pool_conv_transpose have autograd formulas (argmax held fixed)."""
    x, weight, bias, c, pool, hw = _small_conv_args(gen, pool=2)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    d, idx = C.conv_pool_drive(*leaves, *c, pool)
    s = random_state(gen, d.shape, torch.float64).requires_grad_()
    td = C.pool_conv_transpose(s, idx, leaves[1], list(x.shape[2:]), hw, *c, pool)
    (d.square().sum() + (td * x.flip(0)).sum()).backward()
    leaves_r = [t.clone().requires_grad_() for t in (x, weight, bias)]
    s_r = s.detach().clone().requires_grad_()
    dr, idx_r = ops.conv_pool_drive_ref(*leaves_r, *c, pool)
    tdr = ops.pool_conv_transpose_ref(s_r, idx_r, leaves_r[1], list(x.shape[2:]), hw, *c, pool)
    (dr.square().sum() + (tdr * x.flip(0)).sum()).backward()
    for a, b in zip(leaves + [s], leaves_r + [s_r]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    # gradcheck of the formulas themselves (finite differences; argmax stable at this eps)
    xs, ws, bs, cs, _, hws = _small_conv_args(gen, pool=2)
    xs, ws = xs[:1, :2], ws[:2, :2].contiguous()
    _, ids = ops.conv_pool_drive_ref(xs, ws, None, *cs, 2)
    ss = random_state(gen, ids.shape, torch.float64, zero_frac=0.0)
    torch.autograd.gradcheck(lambda s_, w_: C.pool_conv_transpose(s_, ids, w_, list(xs.shape[2:]), hws, *cs, 2),
                             (ss.requires_grad_(), ws.clone().requires_grad_()), fast_mode=True)
    torch.autograd.gradcheck(lambda x_, w_: C.conv_pool_drive(x_, w_, None, *cs, 2)[0],
                             (xs.clone().requires_grad_(), ws.clone().requires_grad_()), fast_mode=True)


def test_inplace_ops_refuse_grad(gen):
    d = rand(gen, 2, 3, dtype=torch.float64).requires_grad_()
    with use_backend("cpu"), pytest.raises(RuntimeError, match="drive requires grad"):
        ops.state_update(d, None, None, None, 1.0, torch.empty(2, 3, dtype=torch.float64))
    with use_backend("cpu"), torch.no_grad():
        ops.state_update(d, None, None, None, 1.0, torch.empty(2, 3, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------

def _spy_compiled(monkeypatch, module_name):
    """Record which compiled ops the wrappers call."""
    calls = []
    real = _library.compiled_op

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(_library, "compiled_op", spy)
    return calls


def _su_args(dtype=torch.float32, device="cpu"):
    d = torch.rand(2, 3, dtype=dtype).to(device)
    return d, None, None, None, 1.0, torch.empty(2, 3, dtype=dtype, device=device)


def test_default_backend_on_cpu_is_compiled(no_backend_env, monkeypatch):
    assert _backend.backend_for(torch.device("cpu")) == "cpu"
    assert "cpu" in ep_kernels.available_backends() and "reference" in ep_kernels.available_backends()
    calls = _spy_compiled(monkeypatch, "state_update")
    ops.state_update(*_su_args())
    assert calls == ["state_update"]


def test_use_backend_selects(no_backend_env, monkeypatch):
    calls = _spy_compiled(monkeypatch, "state_update")
    with use_backend("reference"):
        assert _backend.backend_for(torch.device("cpu")) == "reference"
        ops.state_update(*_su_args())
        assert calls == []
        with use_backend("cpu"):  # innermost wins
            ops.state_update(*_su_args())
            assert calls == ["state_update"]
        assert _backend.backend_for("cpu") == "reference"
    assert _backend.backend_for("cpu") == "cpu"


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_env_var_selects(name, monkeypatch):
    monkeypatch.setenv("EP_KERNELS_BACKEND", name)
    assert _backend.backend_for(torch.device("cpu")) == name
    calls = _spy_compiled(monkeypatch, "state_update")
    ops.state_update(*_su_args())
    assert calls == (["state_update"] if name == "cpu" else [])
    other = "reference" if name == "cpu" else "cpu"
    with use_backend(other):  # the context manager overrides the environment
        assert _backend.backend_for("cpu") == other


def test_unknown_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="bogus"):
        with use_backend("bogus"):
            pass
    monkeypatch.setenv("EP_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="EP_KERNELS_BACKEND"):
        ops.state_update(*_su_args())


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_gpu_backends_refuse_cpu_tensors(name, monkeypatch):
    """Asked for by name, a GPU backend runs or raises, never falls back: 'cuda' takes CUDA
    tensors only; 'triton' takes CPU tensors only under the Triton interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    match = "TRITON_INTERPRET|not installed" if name == "triton" else "'cuda' was asked for but the tensors are on cpu"
    with use_backend(name), pytest.raises(RuntimeError, match=match):
        ops.state_update(*_su_args())
    monkeypatch.setenv("EP_KERNELS_BACKEND", name)
    with pytest.raises(RuntimeError, match=match):
        ops.state_update(*_su_args())


def test_cpu_backend_refuses_other_devices(no_backend_env):
    args = _su_args(device="meta")
    with use_backend("cpu"), pytest.raises(RuntimeError, match="meta"):
        ops.state_update(*args)
    # without a request, a device without compiled kernels runs the reference (shapes only on meta)
    ch = ops.state_update(args[0], None, None, args[0], 1.0, args[5])
    assert ch.device.type == "meta"


def test_cpu_backend_unavailable_is_an_error(no_backend_env, monkeypatch):
    monkeypatch.setattr(ep_kernels._ext, "_LOADED", False)
    monkeypatch.setattr(ep_kernels._ext, "_LOAD_ERROR", "simulated: not built")
    with use_backend("cpu"), pytest.raises(RuntimeError, match="not built"):
        ops.state_update(*_su_args())


@pytest.mark.parametrize("geometry", [
    # (x shape, weight shape, stride, padding, dilation, groups, pool): legal (every integer below
    # 2^31) but extreme; the sparse kernels' padded copy used to overflow int64 here and write out
    # of bounds (found by .ci/sanitize.sh); now such geometries take the dense path.
    ((1, 1, 1, 1), (1, 1, 1, 1), [2 ** 31 - 1, 2 ** 29 - 1], [2 ** 30, 2 ** 28], [1, 1], 1, 2),
    ((2, 6, 6, 4), (4, 3, 1, 2), [2 ** 30, 2 ** 31 - 1], [2 ** 30, 2 ** 31 - 2], [2 ** 30, 2 ** 31 - 1], 2, 2),
    ((1, 2, 3, 5), (2, 2, 1, 1), [2 ** 31 - 2, 2], [2 ** 30, 1], [2, 2 ** 31 - 1], 1, 1),
], ids=["huge_stride", "huge_everything_groups", "huge_dilation_pool1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_extreme_legal_geometries_match_reference(geometry, dtype, gen):
    xs, ws, stride, padding, dilation, groups, pool = geometry
    x = rand(gen, *xs, dtype=dtype)
    w = rand(gen, *ws, dtype=dtype, lo=-1, hi=1)
    hc = ops.conv_out_size(xs[2:], ws[2:], stride, padding, dilation)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    d, idx = ops.conv_pool_drive_ref(x, w, None, pool=pool, **conv)
    with use_backend("cpu"):
        d_cpu, idx_cpu = ops.conv_pool_drive(x, w, None, pool=pool, **conv)
    torch.testing.assert_close(d_cpu, d, rtol=RTOL[dtype], atol=0)
    assert torch.equal(idx_cpu, idx)
    s = random_state(gen, d.shape, dtype, zero_frac=0.2)
    with use_backend("cpu"):
        td = ops.pool_conv_transpose(s, idx, w, list(xs[2:]), hc, pool=pool, **conv)
    torch.testing.assert_close(td, ops.pool_conv_transpose_ref(s, idx, w, list(xs[2:]), hc, pool=pool, **conv),
                               rtol=RTOL[dtype], atol=RTOL[dtype])
    gw, gw_ref = torch.zeros_like(w), torch.zeros_like(w)
    args = (x, s, idx, x.flip(0), s.flip(0), idx.flip(0), hc, stride, padding, dilation, groups, pool, -0.5)
    with use_backend("cpu"):
        ops.contrastive_conv_grad(*args, gw, None)
    ops.contrastive_conv_grad_ref(*args, gw_ref, None)
    torch.testing.assert_close(gw, gw_ref, rtol=RTOL[dtype], atol=RTOL[dtype])
