"""One table of bad inputs to the four ops, each refused the same way (exception type and
words) on every path: the Python wrapper on each backend (reference, cpu, triton), the raw
compiled op ``torch.ops.ep_kernels.<op>``, the raw Triton op ``torch.ops.ep_kernels_triton.<op>``,
and the compiled op on fake tensors (its fake kernel, as torch.compile sees it). The contract
is written twice, in ``ep_kernels/ops/_meta.py`` and ``csrc/checks.h``; this test holds the two
together. It also covers what the adversarial review found: geometry integers that overflow
int64 arithmetic, operands on the meta device, and outputs that partly overlap an input.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ep_kernels.ops as ops
from ep_kernels import use_backend
from ep_kernels.testing import CONV_CASES, conv_setup, random_state

ops.load_compiled()
BIG = 2 ** 63 - 1  # (k - 1) * BIG wraps int64: must be refused before any arithmetic
PATHS = ["reference", "cpu", "triton", "raw", "raw_triton", "fake"]


def _base(gen):
    x, w, b, conv, pool, hw = conv_setup(CONV_CASES[0], torch.float32, gen)  # (2, 3, 5, 9, 11), pool 2
    cv = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
    d, idx = ops.conv_pool_drive_ref(x, w, b, pool=pool, **conv)
    s = random_state(gen, d.shape, torch.float32)
    return dict(x=x, w=w, b=b, cv=cv, pool=pool, hw=hw, s=s, idx=idx, ins=list(x.shape[2:]))


def drive(t, **kw):
    a = dict(x=t["x"], weight=t["w"], bias=t["b"], **t["cv"], pool=t["pool"])
    a.update(kw)
    return "conv_pool_drive", [a[k] for k in ("x", "weight", "bias", "stride", "padding", "dilation", "groups",
                                                "pool")]


def top_down(t, **kw):
    a = dict(s=t["s"], indices=t["idx"], weight=t["w"], input_size=t["ins"], conv_out_size=t["hw"], **t["cv"],
             pool=t["pool"])
    a.update(kw)
    return "pool_conv_transpose", [a[k] for k in ("s", "indices", "weight", "input_size", "conv_out_size", "stride",
                                                    "padding", "dilation", "groups", "pool")]


def update(t, **kw):
    s = t["s"]
    a = dict(drive=s, top_down=s.flip(0), nudge=None, prev=s.flip(1).contiguous(), gain=0.5, out=torch.empty_like(s))
    a.update(kw)
    return "state_update", [a[k] for k in ("drive", "top_down", "nudge", "prev", "gain", "out")]


def contrastive(t, **kw):
    s = t["s"]
    a = dict(x_a=t["x"], s_a=s, idx_a=t["idx"], x_b=t["x"].flip(0), s_b=s.flip(0), idx_b=t["idx"].flip(0),
             conv_out_size=t["hw"], **t["cv"], pool=t["pool"], scale=-0.5, grad_weight=torch.zeros_like(t["w"]),
             grad_bias=torch.zeros_like(t["b"]))
    a.update(kw)
    keys = ("x_a", "s_a", "idx_a", "x_b", "s_b", "idx_b", "conv_out_size", "stride", "padding", "dilation", "groups",
            "pool", "scale", "grad_weight", "grad_bias")
    return "contrastive_conv_grad", [a[k] for k in keys]


def _overlapping(t, shift):
    buf = torch.rand(2 * t["s"].numel() + 8)
    n = t["s"].numel()
    return buf[:n].view(t["s"].shape), buf[shift:shift + n].view(t["s"].shape)


def _partly_overlapping_drive(t):
    d, o = _overlapping(t, 1)
    return update(t, drive=d, out=o)


def _partly_overlapping_prev(t):
    p, o = _overlapping(t, 3)
    return update(t, prev=p, out=o)


NO_FAKE = [p for p in PATHS if p != "fake"]  # memory overlap: fake tensors have no memory

# (id, build(t) -> (op, args), exception, words, paths)
CASES = [
    ("drive_x_3d", lambda t: drive(t, x=t["x"][0]), ValueError,
     r"conv_pool_drive: x must have 4 dimensions \(N, C, H, W\), got shape \[3, 9, 11\]", PATHS),
    ("drive_weight_dtype", lambda t: drive(t, weight=t["w"].double()), TypeError,
     r"conv_pool_drive: weight has dtype torch.float64 but x has torch.float32", PATHS),
    ("drive_x_int", lambda t: drive(t, x=t["x"].long(), weight=t["w"].long(), bias=None), TypeError,
     r"conv_pool_drive: x must be floating-point .* got torch.int64", PATHS),
    ("drive_channels", lambda t: drive(t, x=t["x"][:, :2]), ValueError,
     r"conv_pool_drive: x has 2 channels but the weight \(shape \[5, 3, 3, 3\], groups=1\) expects 3", PATHS),
    ("drive_bias_size", lambda t: drive(t, bias=t["b"][:4]), ValueError,
     r"conv_pool_drive: bias has 4 entries for 5 output channels", PATHS),
    ("drive_pool_0", lambda t: drive(t, pool=0), ValueError,
     r"conv_pool_drive: pool must be an int in \[1, 2147483647\], got 0", PATHS),
    ("drive_too_small", lambda t: drive(t, x=t["x"][..., :2, :2], padding=[0, 0]), ValueError,
     r"conv_pool_drive: x of shape \[2, 3, 2, 2\] gives a 0x0 convolution output, too small for pool=2", PATHS),
    ("drive_stride_0", lambda t: drive(t, stride=[0, 1]), ValueError,
     r"conv_pool_drive: stride must be 2 ints in \[1, 2147483647\], got \[0, 1\]", PATHS),
    ("drive_dilation_overflow", lambda t: drive(t, dilation=[BIG, BIG]), ValueError,
     r"conv_pool_drive: dilation must be 2 ints in \[1, 2147483647\], got \[9223372036854775807, ", PATHS),
    ("drive_padding_overflow", lambda t: drive(t, padding=[BIG, 1]), ValueError,
     r"conv_pool_drive: padding must be 2 ints in \[0, 2147483647\]", PATHS),
    ("drive_groups", lambda t: drive(t, groups=2), ValueError,
     r"conv_pool_drive: weight has 5 output channels, not divisible by groups=2", PATHS),
    ("drive_weight_on_meta", lambda t: drive(t, weight=t["w"].to("meta")), ValueError,
     r"conv_pool_drive: weight is on meta but x is on cpu", PATHS),
    ("drive_bias_on_meta", lambda t: drive(t, bias=t["b"].to("meta")), ValueError,
     r"conv_pool_drive: bias is on meta but x is on cpu", PATHS),
    ("top_down_idx_int32", lambda t: top_down(t, indices=t["idx"].int()), TypeError,
     r"pool_conv_transpose: indices must have dtype torch.int64, got torch.int32", PATHS),
    ("top_down_idx_shape", lambda t: top_down(t, indices=t["idx"][:1]), ValueError,
     r"pool_conv_transpose: indices has shape \[1, 5, 4, 5\] but s has \[2, 5, 4, 5\]", PATHS),
    ("top_down_s_channels", lambda t: top_down(t, s=t["s"][:, :4], indices=t["idx"][:, :4]), ValueError,
     r"pool_conv_transpose: s has 4 channels but weight has 5 output channels", PATHS),
    ("top_down_s_spatial", lambda t: top_down(t, s=t["s"][..., :2], indices=t["idx"][..., :2]), ValueError,
     r"pool_conv_transpose: s has spatial size \[4, 2\] but conv_out_size // pool is \[4, 5\]", PATHS),
    ("top_down_conv_out", lambda t: top_down(t, conv_out_size=[11, 11]), ValueError,
     r"pool_conv_transpose: conv_out_size \[11, 11\] does not match the convolution of an input of size "
     r"\[9, 11\] \(which gives \[9, 11\]\)", PATHS),
    ("top_down_weight_dtype", lambda t: top_down(t, weight=t["w"].double()), TypeError,
     r"pool_conv_transpose: weight has dtype torch.float64 but s has torch.float32", PATHS),
    ("top_down_s_3d", lambda t: top_down(t, s=t["s"][0]), ValueError,
     r"pool_conv_transpose: s must have 4 dimensions", PATHS),
    ("top_down_idx_on_meta", lambda t: top_down(t, indices=t["idx"].to("meta")), ValueError,
     r"pool_conv_transpose: indices is on meta but s is on cpu", PATHS),
    ("top_down_input_size_0", lambda t: top_down(t, input_size=[0, 11]), ValueError,
     r"pool_conv_transpose: input_size must be 2 ints in \[1, 2147483647\], got \[0, 11\]", PATHS),
    ("update_top_down_shape", lambda t: update(t, top_down=t["s"][:1]), ValueError,
     r"state_update: top_down has shape \[1, 5, 4, 5\] but drive has \[2, 5, 4, 5\]", PATHS),
    ("update_nudge_dtype", lambda t: update(t, nudge=t["s"].double()), TypeError,
     r"state_update: nudge has dtype torch.float64 but drive has torch.float32", PATHS),
    ("update_drive_int", lambda t: update(t, drive=t["idx"], top_down=None, prev=None, out=t["idx"].clone()),
     TypeError, r"state_update: drive must be floating-point", PATHS),
    ("update_out_shape", lambda t: update(t, out=t["s"][:1].clone()), ValueError,
     r"state_update: out has shape \[1, 5, 4, 5\] but drive has \[2, 5, 4, 5\]", PATHS),
    ("update_out_on_meta", lambda t: update(t, out=t["s"].to("meta")), ValueError,
     r"state_update: out is on meta but drive is on cpu", PATHS),
    ("update_gain_nan", lambda t: update(t, gain=float("nan")), ValueError,
     r"state_update: gain must be a finite number, got nan", PATHS),
    ("update_out_is_prev", lambda t: update(t, prev=t["s"], out=t["s"]), ValueError,
     r"state_update: out overlaps prev in memory", NO_FAKE),
    ("update_out_partly_prev", _partly_overlapping_prev, ValueError, r"state_update: out overlaps prev in memory",
     NO_FAKE),
    ("update_out_partly_drive", _partly_overlapping_drive, ValueError,
     r"state_update: out partly overlaps drive in memory", NO_FAKE),
    ("update_out_none", lambda t: update(t, out=None), TypeError, r"state_update: out must be a Tensor, got NoneType",
     ["reference", "cpu", "triton"]),
    ("contrastive_s_shape", lambda t: contrastive(t, s_b=t["s"][:1], idx_b=t["idx"][:1]), ValueError,
     r"contrastive_conv_grad: s_a has shape \[2, 5, 4, 5\] but s_b has \[1, 5, 4, 5\]", PATHS),
    ("contrastive_idx_int32", lambda t: contrastive(t, idx_b=t["idx"].int()), TypeError,
     r"contrastive_conv_grad: idx_b must have dtype torch.int64, got torch.int32", PATHS),
    ("contrastive_x_dtype", lambda t: contrastive(t, x_b=t["x"].double()), TypeError,
     r"contrastive_conv_grad: x_b has dtype torch.float64 but grad_weight has torch.float32", PATHS),
    ("contrastive_bias_size", lambda t: contrastive(t, grad_bias=t["b"][:3].clone()), ValueError,
     r"contrastive_conv_grad: grad_bias has 3 entries for 5 output channels", PATHS),
    ("contrastive_conv_out", lambda t: contrastive(t, conv_out_size=[10, 11]), ValueError,
     r"contrastive_conv_grad: conv_out_size \[10, 11\] does not match the convolution of x_a", PATHS),
    ("contrastive_grad_3d", lambda t: contrastive(t, grad_weight=t["w"][0].clone()), ValueError,
     r"contrastive_conv_grad: grad_weight must have 4 dimensions", PATHS),
    ("contrastive_idx_on_meta", lambda t: contrastive(t, idx_a=t["idx"].to("meta")), ValueError,
     r"contrastive_conv_grad: idx_a is on meta but s_a is on cpu", PATHS),
    ("contrastive_scale_inf", lambda t: contrastive(t, scale=float("inf")), ValueError,
     r"contrastive_conv_grad: scale must be a finite number, got inf", PATHS),
    # The review's reproduction: x (1, 1, 8, 8), s (1, 2, 5, 5), dilation 2^63 - 1 (read past the buffer before).
    ("contrastive_dilation_overflow", lambda t: _review_overflow_case(), ValueError,
     r"contrastive_conv_grad: dilation must be 2 ints in \[1, 2147483647\], got \[9223372036854775807, "
     r"9223372036854775807\]", PATHS),
]


def _review_overflow_case():
    x = torch.rand(1, 1, 8, 8)
    s = torch.rand(1, 2, 5, 5)
    idx = torch.zeros(1, 2, 5, 5, dtype=torch.int64)
    return "contrastive_conv_grad", [x, s, idx, x, s * 0.5, idx, [10, 10], [1, 1], [0, 0], [BIG, BIG], 1, 2, 1.0,
                                     torch.zeros(2, 1, 3, 3), None]


def _call(path, op, args):
    if path in ("reference", "cpu", "triton"):
        with use_backend(path):
            return getattr(ops, op)(*args)
    if path == "raw":
        return getattr(torch.ops.ep_kernels, op)(*args)
    if path == "raw_triton":
        from ep_kernels.ops import _library

        return _library.triton_op(op)(*args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return getattr(torch.ops.ep_kernels, op)(*fake)


PARAMS = [pytest.param(case, path, id=f"{case[0]}-{path}") for case in CASES for path in case[4]]


@pytest.mark.parametrize("case,path", PARAMS)
def test_bad_input_is_refused_alike(case, path, gen):
    name, build, exc, words, paths = case
    op, args = build(_base(gen))
    before = [a.clone() for a in args if isinstance(a, torch.Tensor) and a.device.type != "meta"]
    with pytest.raises(exc, match=words):
        _call(path, op, args)
    after = [a for a in args if isinstance(a, torch.Tensor) and a.device.type != "meta"]
    for a, b in zip(before, after):  # nothing written before the refusal
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all()


def test_every_case_runs_on_several_paths():
    """A case that no path could check would pass silently: each runs on at least 3 paths."""
    assert all(len(c[4]) >= 3 for c in CASES)
