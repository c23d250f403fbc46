"""The one harness of cases, builders and checks shared by the tests (``tests/``), the
benchmarks (``bench/``) and the GPU check (``bench/gpu_check.py``), as
``torch_scatter/testing.py`` is for its project: a second copy would drift.

- ``CONV_CASES``: the convolution geometries every op is checked at (odd sizes, padding
  0/1/2, kernels 3, 5 and rectangular, batch 1, channel counts not multiples of 8, stride and
  dilation 2, groups 2, pool 1/2/3 on sizes not divisible by the pool); ``VGG5_CASES``: the
  four layers of VGG-5 at batch 8 (the GPU check's realistic sizes).
- Input builders: ``conv_setup``, ``random_state`` (in [0, 1] with exact zeros, as the clamp
  makes them), ``random_window_indices``, ``noncontiguous``.
- ``check_<op>(backend, device, dtype, case, gen, ...)``: the op on ``backend`` against its
  plain-torch reference on fresh random inputs; raises ``AssertionError`` saying what differs.
- Network builders: ``small_net`` (the tests' four small kinds), ``vgg5`` (the preset's network,
  optionally narrowed), ``make_batch``; and ``step_flops`` (the dense-equivalent work of one
  relaxation step).

Tolerances: float32 1e-5 and float64 1e-12 relative to the same computation on absolute
values (a bound on any summation order's rounding); elementwise ops are bitwise.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from ._backend import use_backend
from .layers import EPConv2d, EPLinear
from .models import build_network
from .network import EPNetwork

RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}

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
VGG5_CASES = [
    (8, 3, 128, 32, 32, 3, 1, 1, 1, 1, 2),
    (8, 128, 256, 16, 16, 3, 1, 1, 1, 1, 2),
    (8, 256, 512, 8, 8, 3, 1, 1, 1, 1, 2),
    (8, 512, 512, 4, 4, 3, 0, 1, 1, 1, 2),
]
LAYOUTS = ["contiguous", "transposed", "strided"]


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def rand(gen, *shape, dtype, lo=0.0, hi=1.0):
    """Uniform in [lo, hi): fresh, seeded, never zeros-by-construction."""
    return torch.rand(*shape, generator=gen, dtype=dtype) * (hi - lo) + lo


def noncontiguous(t, kind):
    """A non-contiguous tensor with the values of ``t``: ``"transposed"`` (channels-last-like
    strides) or ``"strided"`` (every second element of a larger buffer); ``"contiguous"``: ``t``."""
    if kind == "contiguous":
        return t
    if kind == "transposed":
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        fill = float("nan") if t.is_floating_point() else -1
        big = torch.full(t.shape[:-1] + (2 * t.shape[-1],), fill, dtype=t.dtype, device=t.device)
        out = big[..., ::2]
        out.copy_(t)
    assert not out.is_contiguous() or t.shape[-1] == 1 and t.shape[-2] == 1
    return out


def conv_setup(case, dtype, gen):
    """Random ``x``, ``weight``, ``bias`` for a case; returns them with the conv keywords, the
    pool and the convolution's output size."""
    n, cin, cout, h, w, k, pad, stride, dil, groups, pool = case
    k, pad, stride, dil = _pair(k), _pair(pad), _pair(stride), _pair(dil)
    x = rand(gen, n, cin, h, w, dtype=dtype)
    weight = rand(gen, cout, cin // groups, *k, dtype=dtype, lo=-1, hi=1) / math.sqrt(cin * k[0] * k[1])
    bias = rand(gen, cout, dtype=dtype, lo=-0.2, hi=0.2)
    conv = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    return x, weight, bias, conv, pool, ops.conv_out_size([h, w], k, stride, pad, dil)


def random_window_indices(gen, n, c, hc, wc, pool):
    """Max-pool indices with the winner uniformly anywhere in its window."""
    hp, wp = hc // pool, wc // pool
    r = torch.randint(0, pool, (n, c, hp, wp), generator=gen)
    q = torch.randint(0, pool, (n, c, hp, wp), generator=gen)
    rows = torch.arange(hp).view(1, 1, hp, 1) * pool + r
    cols = torch.arange(wp).view(1, 1, 1, wp) * pool + q
    return rows * wc + cols


def random_state(gen, shape, dtype, zero_frac=0.3):
    """A state in [0, 1] with some exact zeros (the clamp makes them common)."""
    s = rand(gen, *shape, dtype=dtype, lo=0.05, hi=1.0)
    return s.masked_fill(torch.rand(*shape, generator=gen) < zero_frac, 0.0)


def assert_close_scaled(got, ref, scale, rtol):
    """|got - ref| <= rtol * (scale + |ref|) elementwise, where ``scale`` is the same
    computation on absolute values (a bound on the rounding of any summation order)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, ref.shape, got.dtype, ref.dtype)
    err = (got - ref).abs()
    bound = rtol * (scale + ref.abs()) + torch.finfo(ref.dtype).tiny
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements differ; max err {err.max().item():.3g}, "
                           f"max rel err {(err / bound * rtol).max().item():.3g}")


def _to(device, *ts):
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in ts)


# -- one check per op: ``backend`` against the reference, inputs on ``device`` ---------------

def check_conv_pool_drive(backend, device, dtype, case, gen, layout="contiguous", argmax_mismatch=0.0):
    """Drive and argmax. ``argmax_mismatch``: the fraction of windows allowed another winner
    (near-ties decided by a last-bit difference of a GPU convolution); 0 on CPU."""
    x, weight, bias, conv, pool, _ = conv_setup(case, dtype, gen)
    x, weight, bias = _to(device, noncontiguous(x, layout), weight, bias)
    with use_backend(backend):
        d, i = ops.conv_pool_drive(x, weight, bias, pool=pool, **conv)
    rd, ri = ops.conv_pool_drive_ref(x, weight, bias, pool=pool, **conv)
    assert d.shape == rd.shape and d.dtype == rd.dtype and d.is_contiguous()
    torch.testing.assert_close(d, rd, rtol=RTOL[dtype], atol=0)
    assert i.dtype == torch.int64 and i.shape == ri.shape
    mismatched = int((i != ri).sum())
    assert mismatched <= argmax_mismatch * i.numel(), f"{mismatched} of {i.numel()} argmax positions differ"


def check_pool_conv_transpose(backend, device, dtype, case, gen, layout="contiguous"):
    x, weight, _, conv, pool, (hc, wc) = conv_setup(case, dtype, gen)
    n, cout = x.shape[0], weight.shape[0]
    s = random_state(gen, (n, cout, hc // pool, wc // pool), dtype)
    idx = random_window_indices(gen, n, cout, hc, wc, pool) if pool > 1 else torch.empty(0, dtype=torch.int64)
    s, weight = noncontiguous(s, layout), noncontiguous(weight, layout)
    if pool > 1:
        idx = noncontiguous(idx, layout)
    s, idx, weight = _to(device, s, idx, weight)
    args = (list(x.shape[2:]), [hc, wc])
    with use_backend(backend):
        out = ops.pool_conv_transpose(s, idx, weight, *args, pool=pool, **conv)
    wide = (lambda t: t.double()) if dtype == torch.bfloat16 else (lambda t: t)
    ref = ops.pool_conv_transpose_ref(wide(s), idx, wide(weight), *args, pool=pool, **conv)
    scale = ops.pool_conv_transpose_ref(wide(s).abs(), idx, wide(weight).abs(), *args, pool=pool, **conv)
    assert out.is_contiguous() and out.dtype == dtype
    assert_close_scaled(wide(out), ref, scale, RTOL[dtype])


def check_state_update(backend, device, dtype, shape, gain, parts, gen):
    """Bitwise against the reference (elementwise, same operation order); ``parts``: "all",
    "no_top_down", "no_nudge" or "drive_only". 16-bit dtypes: against the float32 computation
    rounded once at the store (how the kernels compute them)."""
    drive = rand(gen, *shape, dtype=dtype, lo=-1.0, hi=4.0)
    td = None if parts in ("no_top_down", "drive_only") else rand(gen, *shape, dtype=dtype, lo=-1, hi=1)
    nudge = None if parts in ("no_nudge", "drive_only") else rand(gen, *shape, dtype=dtype, lo=-0.5, hi=0.5)
    prev = rand(gen, *shape, dtype=dtype)
    drive, td, nudge, prev = _to(device, drive, td, nudge, prev)
    for p in (prev, None):
        out = torch.empty(shape, dtype=dtype, device=device)
        out_ref = torch.empty(shape, dtype=dtype, device=device)
        with use_backend(backend):
            ch = ops.state_update(drive, td, nudge, p, gain, out)
        if dtype in (torch.bfloat16, torch.float16):
            f32 = [None if t is None else t.float() for t in (drive, td, nudge, p)]
            out32 = torch.empty(shape, device=device)
            ops.state_update_ref(*f32, gain, out32)
            out_ref.copy_(out32)
            ch_ref = (out_ref.float() - p.float()).abs().max().to(dtype) if p is not None else ch.new_empty(0)
        else:
            ch_ref = ops.state_update_ref(drive, td, nudge, p, gain, out_ref)
        assert torch.equal(out, out_ref), "state differs from the reference"
        assert ch.shape == ch_ref.shape and ch.dtype == ch_ref.dtype and torch.equal(ch, ch_ref), (ch, ch_ref)
        assert (out == 1).any() and (out == 0).any()  # the clamp is exercised


def check_state_update_noncontiguous(backend, device, dtype, layout, gen):
    """Non-contiguous operands and output; returns the (contiguous) operands for more checks."""
    shape = (2, 5, 6, 7)
    drive, td, nudge, prev = _to(device, *(rand(gen, *shape, dtype=dtype, lo=-1, hi=2) for _ in range(4)))
    out = noncontiguous(torch.zeros(shape, dtype=dtype, device=device), layout)
    out_ref = torch.empty(shape, dtype=dtype, device=device)
    args = [noncontiguous(t, layout) for t in (drive, td, nudge, prev)]
    with use_backend(backend):
        ch = ops.state_update(*args[:3], args[3], 0.5, out)
    ch_ref = ops.state_update_ref(drive, td, nudge, prev, 0.5, out_ref)
    assert torch.equal(out, out_ref) and torch.equal(ch, ch_ref)
    return drive, td, nudge, prev


def check_contrastive_conv_grad(backend, device, dtype, case, gen, layout="contiguous", rtol=None):
    """Distinct inputs with and without bias, and one input for both states (the first
    layer's case), accumulated into a non-zero gradient."""
    x, weight, _, conv, pool, (hc, wc) = conv_setup(case, dtype, gen)
    n, cout = x.shape[0], weight.shape[0]
    x_b = rand(gen, *x.shape, dtype=dtype)
    sp = (n, cout, hc // pool, wc // pool)
    s_a, s_b = random_state(gen, sp, dtype), random_state(gen, sp, dtype)
    if pool > 1:
        i_a, i_b = (random_window_indices(gen, n, cout, hc, wc, pool) for _ in range(2))
    else:
        i_a = i_b = torch.empty(0, dtype=torch.int64)
    x, x_b, s_a, s_b = (noncontiguous(t, layout) for t in (x, x_b, s_a, s_b))
    x, x_b, s_a, s_b, i_a, i_b = _to(device, x, x_b, s_a, s_b, i_a, i_b)
    scale = -0.37
    gw0 = _to(device, rand(gen, *weight.shape, dtype=dtype, lo=-1, hi=1))[0]
    gb0 = _to(device, rand(gen, cout, dtype=dtype, lo=-1, hi=1))[0]
    wide = (lambda t: t.double()) if dtype == torch.bfloat16 else (lambda t: t)
    rtol = RTOL[dtype] if rtol is None else rtol
    for xb, with_bias in ((x_b, True), (x_b, False), (x, True)):
        gw = gw0.clone()
        gb = gb0.clone() if with_bias else None
        args = (x, s_a, i_a, xb, s_b, i_b, [hc, wc], conv["stride"], conv["padding"], conv["dilation"],
                conv["groups"], pool, scale)
        with use_backend(backend):
            ops.contrastive_conv_grad(*args, gw, gb)
        wargs = tuple(wide(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        gw_ref, gb_ref = wide(gw0.clone()), wide(gb0.clone()) if with_bias else None
        ops.contrastive_conv_grad_ref(*wargs, gw_ref, gb_ref)
        absg = torch.zeros_like(gw_ref)  # both weight-gradients on absolute values, plus the initial grad
        for xx, ss, ii in ((wargs[0], wargs[1], i_a), (wargs[3], wargs[4], i_b)):
            u = F.max_unpool2d(ss, ii, pool, pool, output_size=[hc, wc]) if pool > 1 else ss
            absg += torch.nn.grad.conv2d_weight(xx.abs(), weight.shape, u.abs(), **conv)
        assert_close_scaled(wide(gw), gw_ref, abs(scale) * absg + wide(gw0).abs(), rtol)
        if with_bias:
            babs = (wargs[1].abs().sum((0, 2, 3)) + wargs[4].abs().sum((0, 2, 3))) * abs(scale) + wide(gb0).abs()
            assert_close_scaled(wide(gb), gb_ref, babs, rtol)


# -- networks ---------------------------------------------------------------------------------

def small_net(kind, dtype=torch.float64, seed=0, activation="hardsigmoid_half", mse=False, H=8, **kw):
    """The tests' small networks for 2-channel H x H inputs: ``conv_pool`` (two pooled convs),
    ``conv_nopool`` (kernels 3 and 5, padding 0 and 1, pooling only at the top), ``mixed``
    (a conv with pool 3 on a size not divisible by it, then linear layers), ``linear``."""
    torch.manual_seed(seed)
    if kind == "conv_pool":
        layers = [EPConv2d(2, 5, 3, padding=1, pool=2), EPConv2d(5, 7, 3, padding=1, pool=2)]
        feat = 7 * (H // 4) ** 2
    elif kind == "conv_nopool":
        layers = [EPConv2d(2, 5, 3, padding=0), EPConv2d(5, 6, 5, padding=1), EPConv2d(6, 3, 3, padding=1, pool=2)]
        feat = 3 * ((H - 4) // 2) ** 2
    elif kind == "mixed":
        layers = [EPConv2d(2, 4, 3, padding=1, pool=3), EPLinear(4 * (H // 3) ** 2, 9), EPLinear(9, 10)]
        feat = 10
    elif kind == "linear":
        layers = [EPLinear(2 * H * H, 12), EPLinear(12, 10)]
        feat = 10
    else:
        raise ValueError(f"unknown small_net kind {kind!r}")
    if mse and not (isinstance(layers[-1], EPLinear) and layers[-1].out_features == 10):
        raise ValueError(f"MSE mode needs a last EPLinear with 10 units; kind {kind!r} has none")
    net = EPNetwork(*layers, readout=None if mse else nn.Linear(feat, 10), activation=activation, **kw)
    return net.to(dtype)


def make_batch(n=4, H=8, dtype=torch.float64, seed=1, flat=False, channels=2, n_classes=10):
    """Uniform inputs (N, channels, H, H) (flattened if ``flat``) and random labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, H, H, generator=g, dtype=dtype)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return (x.flatten(1) if flat else x), y


def vgg5(width=1.0, dtype=torch.float32, seed=0, n_classes=10, **kw):
    """The ``vgg5`` preset (128-256-512-512 channels times ``width``, 32 x 32 x 3 inputs), as
    ``ep-train --preset vgg5`` builds it, seeded."""
    torch.manual_seed(seed)
    return build_network("vgg5", (3, 32, 32), n_classes, width=width, **kw).to(dtype)


def step_flops(net, x):
    """Dense-equivalent FLOPs (2 x multiply-adds) of one relaxation step: every layer's forward
    convolution (or matrix product), and the transposed one of every layer above the first."""
    total, shape = 0, tuple(x.shape[1:])
    for l, layer in enumerate(net.layers):
        if isinstance(layer, EPConv2d):
            h, w = layer.conv_out_size(shape[1:])
            kh, kw = layer.kernel_size
            f = 2 * x.shape[0] * layer.out_channels * h * w * (layer.in_channels // layer.groups) * kh * kw
        else:
            f = 2 * x.shape[0] * layer.in_features * layer.out_features
        total += f * (2 if l > 0 else 1)
        shape = layer.state_shape(shape)
    return total


# -- comparing gradients ----------------------------------------------------------------------

def grads(net):
    """Every parameter's ``.grad``, cloned, by name."""
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def cosine(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def relerr(a, b):
    """``|a - b| / |b|`` (Frobenius norms)."""
    return ((a - b).norm() / b.norm()).item()
