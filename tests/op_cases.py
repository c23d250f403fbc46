"""Op test cases shared by every backend's tests (tests/test_ops.py: 'cpu', tests/test_triton.py:
'triton', tests/test_cuda.py: 'cuda'): the shape spread, input builders, the scaled closeness
check, and one check per op against its plain-torch reference, parametrized by backend and
device so the backends are held to the same test.
"""
import math

import torch
import torch.nn.functional as F

import ep_kernels.ops as ops
from ep_kernels import use_backend
from conftest import RTOL

# (N, C_in, C_out, H, W, kernel, padding, stride, dilation, groups, pool)
CONV_CASES = [
    (2, 3, 5, 9, 11, 3, 1, 1, 1, 1, 2),      # odd sizes, 9 and 11 not divisible by the pool
    (1, 4, 6, 8, 8, 3, 0, 1, 1, 1, 2),       # batch 1, padding 0
    (2, 5, 7, 10, 9, 5, 2, 1, 1, 1, 3),      # kernel 5, pool 3, 10x9 not divisible by 3
    (2, 6, 10, 7, 7, 3, 1, 1, 1, 1, 1),      # no pooling
    (3, 4, 9, 9, 9, 5, 0, 1, 1, 1, 2),       # kernel 5, padding 0
    (2, 4, 6, 11, 12, 3, 1, 2, 1, 2, 2),     # stride 2, groups 2
    (2, 3, 4, 12, 13, 3, 2, 1, 2, 1, 2),     # dilation 2
    (2, 9, 12, 7, 10, (3, 5), (1, 2), 1, 1, 1, 2),  # rectangular kernel
    (1, 17, 20, 6, 6, 3, 1, 1, 1, 1, 3),     # channels not multiples of 8, pool 3 exactly
]
CASE_IDS = [f"case{i}" for i in range(len(CONV_CASES))]


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _rand(gen, *shape, dtype, lo=0.0, hi=1.0):
    return torch.rand(*shape, generator=gen, dtype=dtype) * (hi - lo) + lo


def _noncontig(t, kind):
    """A non-contiguous tensor with the values of ``t``."""
    if kind == "transposed":  # channels-last-like strides
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:  # every second element of a larger buffer
        fill = float("nan") if t.is_floating_point() else -1
        big = torch.full(t.shape[:-1] + (2 * t.shape[-1],), fill, dtype=t.dtype)
        out = big[..., ::2]
        out.copy_(t)
    assert not out.is_contiguous() or t.shape[-1] == 1 and t.shape[-2] == 1
    assert torch.equal(out, t)
    return out


def _conv_setup(case, dtype, gen):
    n, cin, cout, h, w, k, pad, stride, dil, groups, pool = case
    k, pad, stride, dil = _pair(k), _pair(pad), _pair(stride), _pair(dil)
    x = _rand(gen, n, cin, h, w, dtype=dtype)
    weight = _rand(gen, cout, cin // groups, *k, dtype=dtype, lo=-1, hi=1) / math.sqrt(cin * k[0] * k[1])
    bias = _rand(gen, cout, dtype=dtype, lo=-0.2, hi=0.2)
    conv = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    hc = (h + 2 * pad[0] - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    wc = (w + 2 * pad[1] - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    return x, weight, bias, conv, pool, [hc, wc]


def _random_window_indices(gen, n, c, hc, wc, pool):
    """Max-pool indices with the winner uniformly anywhere in its window."""
    hp, wp = hc // pool, wc // pool
    r = torch.randint(0, pool, (n, c, hp, wp), generator=gen)
    q = torch.randint(0, pool, (n, c, hp, wp), generator=gen)
    rows = torch.arange(hp).view(1, 1, hp, 1) * pool + r
    cols = torch.arange(wp).view(1, 1, 1, wp) * pool + q
    return rows * wc + cols


def _state(gen, shape, dtype, zero_frac=0.3):
    """A state in [0, 1] with some exact zeros (the clamp makes them common)."""
    s = _rand(gen, *shape, dtype=dtype, lo=0.05, hi=1.0)
    mask = torch.rand(*shape, generator=gen) < zero_frac
    return s.masked_fill(mask, 0.0)


def _assert_close_scaled(got, ref, scale, rtol):
    """|got - ref| <= rtol * scale elementwise, where ``scale`` is the same computation on
    absolute values (a bound on the rounding of any summation order)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err = (got - ref).abs()
    bound = rtol * (scale + ref.abs()) + torch.finfo(ref.dtype).tiny
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements differ; max err {err.max().item():.3g}, "
                           f"max rel err {(err / bound * rtol).max().item():.3g}")


def _to(device, *ts):
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in ts)


# --------------------------------------------------------------------------------------------
# one check per op: ``backend`` against the reference, inputs moved to ``device``
# --------------------------------------------------------------------------------------------

def check_conv_pool_drive(backend, device, case, layout, dtype, gen, contiguous_out=False):
    x, weight, bias, conv, pool, _ = _conv_setup(case, dtype, gen)
    if layout != "contiguous":
        x = _noncontig(x, layout)
    x, weight, bias = _to(device, x, weight, bias)
    with use_backend(backend):
        d, i = ops.conv_pool_drive(x, weight, bias, pool=pool, **conv)
    rd, ri = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    assert d.shape == rd.shape and d.dtype == rd.dtype
    assert d.is_contiguous() or not contiguous_out
    # The convolution is ATen's (cpu) or reproduces its argmax: identical indices.
    torch.testing.assert_close(d, rd, rtol=RTOL[dtype], atol=0)
    assert i.dtype == torch.int64 and torch.equal(i, ri)


def check_pool_conv_transpose(backend, device, case, layout, dtype, gen, contiguous_out=False):
    x, weight, bias, conv, pool, (hc, wc) = _conv_setup(case, dtype, gen)
    n, cout = x.shape[0], weight.shape[0]
    s = _state(gen, (n, cout, hc // pool, wc // pool), dtype)
    idx = _random_window_indices(gen, n, cout, hc, wc, pool) if pool > 1 else torch.empty(0, dtype=torch.int64)
    if layout != "contiguous":
        s = _noncontig(s, layout)
        weight = _noncontig(weight, layout)
        if pool > 1:
            idx = _noncontig(idx, layout)
    s, idx, weight = _to(device, s, idx, weight)
    args = (list(x.shape[2:]), [hc, wc])
    with use_backend(backend):
        out = ops.pool_conv_transpose(s, idx, weight, *args, pool=pool, **conv)
    ref = ops.pool_conv_transpose_ref(s, idx, weight, *args, pool=pool, **conv)
    scale = ops.pool_conv_transpose_ref(s.abs(), idx, weight.abs(), *args, pool=pool, **conv)
    assert out.is_contiguous() or not contiguous_out
    _assert_close_scaled(out, ref, scale, RTOL[dtype])


def check_state_update(backend, device, shape, gain, parts, dtype, gen):
    drive = _rand(gen, *shape, dtype=dtype, lo=-1.0, hi=4.0)
    td = None if parts in ("no_top_down", "drive_only") else _rand(gen, *shape, dtype=dtype, lo=-1, hi=1)
    nudge = None if parts in ("no_nudge", "drive_only") else _rand(gen, *shape, dtype=dtype, lo=-0.5, hi=0.5)
    prev = _rand(gen, *shape, dtype=dtype)
    drive, td, nudge, prev = _to(device, drive, td, nudge, prev)
    for p in (prev, None):
        out = torch.empty(shape, dtype=dtype, device=device)
        out_ref = torch.empty(shape, dtype=dtype, device=device)
        with use_backend(backend):
            ch = ops.state_update(drive, td, nudge, p, gain, out)
        ch_ref = ops.state_update_ref(drive, td, nudge, p, gain, out_ref)
        assert torch.equal(out, out_ref)  # elementwise, same operation order: bitwise
        assert ch.shape == ch_ref.shape and ch.dtype == ch_ref.dtype
        assert torch.equal(ch, ch_ref)
        assert (out == 1).any() and (out == 0).any()  # the clamp is exercised


def check_state_update_noncontiguous(backend, device, layout, dtype, gen):
    """Non-contiguous operands and output; returns the (contiguous) operands for more checks."""
    shape = (2, 5, 6, 7)
    drive, td, nudge, prev = _to(device, *(_rand(gen, *shape, dtype=dtype, lo=-1, hi=2) for _ in range(4)))
    out = _to(device, _noncontig(torch.zeros(shape, dtype=dtype), layout))[0]
    out_ref = torch.empty(shape, dtype=dtype, device=device)
    args = [_to(device, _noncontig(t.cpu(), layout))[0] for t in (drive, td, nudge, prev)]
    with use_backend(backend):
        ch = ops.state_update(*args[:3], args[3], 0.5, out)
    ch_ref = ops.state_update_ref(drive, td, nudge, prev, 0.5, out_ref)
    assert torch.equal(out, out_ref) and torch.equal(ch, ch_ref)
    return drive, td, nudge, prev


def check_contrastive_conv_grad(backend, device, case, layout, dtype, gen):
    x, weight, bias, conv, pool, (hc, wc) = _conv_setup(case, dtype, gen)
    n, cout = x.shape[0], weight.shape[0]
    x_b = _rand(gen, *x.shape, dtype=dtype)
    sp = (n, cout, hc // pool, wc // pool)
    s_a, s_b = _state(gen, sp, dtype), _state(gen, sp, dtype)
    if pool > 1:
        i_a, i_b = (_random_window_indices(gen, n, cout, hc, wc, pool) for _ in range(2))
    else:
        i_a = i_b = torch.empty(0, dtype=torch.int64)
    if layout != "contiguous":
        x, x_b, s_a, s_b = (_noncontig(t, layout) for t in (x, x_b, s_a, s_b))
    x, x_b, s_a, s_b, i_a, i_b = _to(device, x, x_b, s_a, s_b, i_a, i_b)
    scale = -0.37
    gw0 = _to(device, _rand(gen, *weight.shape, dtype=dtype, lo=-1, hi=1))[0]  # accumulates into a grad
    gb0 = _to(device, _rand(gen, cout, dtype=dtype, lo=-1, hi=1))[0]
    # distinct inputs with and without bias, and one input for both states (the first layer's case)
    for xb, with_bias in ((x_b, True), (x_b, False), (x, True)):
        gw, gw_ref = gw0.clone(), gw0.clone()
        gb, gb_ref = (gb0.clone(), gb0.clone()) if with_bias else (None, None)
        args = (x, s_a, i_a, xb, s_b, i_b, [hc, wc], conv["stride"], conv["padding"], conv["dilation"],
                conv["groups"], pool, scale)
        with use_backend(backend):
            ops.contrastive_conv_grad(*args, gw, gb)
        ops.contrastive_conv_grad_ref(*args, gw_ref, gb_ref)
        # error scale: both weight-gradients on absolute values, plus the initial grad
        absg = torch.zeros_like(gw0)
        for xx, ss, ii in ((x, s_a, i_a), (xb, s_b, i_b)):
            u = F.max_unpool2d(ss, ii, pool, pool, output_size=[hc, wc]) if pool > 1 else ss
            absg += torch.nn.grad.conv2d_weight(xx.abs(), weight.shape, u.abs(), **conv)
        _assert_close_scaled(gw, gw_ref, abs(scale) * absg + gw0.abs(), RTOL[dtype])
        if with_bias:
            babs = (s_a.abs().sum((0, 2, 3)) + s_b.abs().sum((0, 2, 3))) * abs(scale) + gb0.abs()
            _assert_close_scaled(gb, gb_ref, babs, RTOL[dtype])
