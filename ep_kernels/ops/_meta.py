"""The contract of every op: one meta function per op, both its fake kernel and its check.

Each ``<op>_meta`` checks every argument (types, dimensions, dtypes, devices, geometry) using
metadata only, then returns empty outputs of the right shape, dtype and device. It is

- the fake kernel of the compiled op ``torch.ops.ep_kernels.<op>`` and of the Triton op
  ``torch.ops.ep_kernels_triton.<op>`` (``torch.compile``, ``torch.export``, ``opcheck``);
- the check the Python wrapper (``ep_kernels.ops.<op>``) runs before any backend, so the
  reference and Triton backends refuse bad input exactly like the compiled kernels.

The C++ kernels check the same things in ``csrc/checks.h`` with the same words and exception
types (``TORCH_CHECK_VALUE`` is a ``ValueError``, ``TORCH_CHECK_TYPE`` a ``TypeError``), so a
direct ``torch.ops.ep_kernels.<op>`` call is refused the same way. Keep the two in step;
``tests/test_op_errors.py`` asserts the words from every backend and the raw ops.

Messages name the op, the argument and the value: ``"<op>: <argument> <what is wrong>, got
<value>"``, shapes as ``[2, 3]``, dtypes as ``torch.float32``.

What metadata cannot show is checked elsewhere: the values of index tensors by the kernels
(an index outside its pooling window is refused), memory overlap by ``state_update``'s
wrapper and kernels (real tensors only; fake tensors have no memory).
"""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Largest stride, padding, dilation, pool, group count, kernel or spatial size accepted. With
# every such integer below 2^31, all geometry arithmetic (e.g. (k - 1) * dilation + 2 * padding)
# stays far inside int64 in every kernel.
MAX_GEOMETRY = 2 ** 31 - 1


# -- generic checks (ValueError for a bad value or shape, TypeError for a bad type or dtype) ---

def _value(cond, op, msg):
    if not cond:
        raise ValueError(f"{op}: {msg}")


def _type(cond, op, msg):
    if not cond:
        raise TypeError(f"{op}: {msg}")


def shape_str(t):
    return str(list(t.shape))


def tensor(op, t, name, ndim=None, layout=""):
    _type(isinstance(t, torch.Tensor), op, f"{name} must be a Tensor, got {type(t).__name__}")
    if ndim is not None:
        _value(t.dim() == ndim, op, f"{name} must have {ndim} dimensions{layout}, got shape {shape_str(t)}")
    _value(not t.is_sparse and t.layout == torch.strided, op, f"{name} must be a dense (strided) tensor, got "
           f"layout {t.layout}")
    _value(all(d <= MAX_GEOMETRY for d in t.shape), op,
           f"{name} has a dimension larger than {MAX_GEOMETRY}: shape {shape_str(t)}")


def floating(op, t, name):
    _type(t.dtype in FLOAT_DTYPES, op, f"{name} must be floating-point (float32, float64, bfloat16 or float16), "
          f"got {t.dtype}")


def like(op, t, name, ref, ref_name, ndim=None, layout=""):
    """``t`` is a tensor with ``ref``'s dtype and device."""
    tensor(op, t, name, ndim, layout)
    _type(t.dtype == ref.dtype, op, f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    _value(t.device == ref.device, op, f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def index_tensor(op, idx, name, s, s_name):
    tensor(op, idx, name)
    _type(idx.dtype == torch.int64, op, f"{name} must have dtype torch.int64, got {idx.dtype}")
    _value(idx.device == s.device, op, f"{name} is on {idx.device} but {s_name} is on {s.device}")
    _value(idx.shape == s.shape, op, f"{name} has shape {shape_str(idx)} but {s_name} has {shape_str(s)}")


def int_pair(op, v, name, lo):
    ok = (isinstance(v, (list, tuple)) and len(v) == 2
          and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and lo <= i <= MAX_GEOMETRY for i in v))
    _value(ok, op, f"{name} must be 2 ints in [{lo}, {MAX_GEOMETRY}], got {_show(v)}")
    return [int(i) for i in v]


def int_in_range(op, v, name, lo):
    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= v <= MAX_GEOMETRY
    _value(ok, op, f"{name} must be an int in [{lo}, {MAX_GEOMETRY}], got {v!r}")
    return int(v)


def finite_number(op, v, name):
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    _value(ok, op, f"{name} must be a finite number, got {v!r}")


def _show(v):
    return str(list(v)) if isinstance(v, tuple) else repr(v)


def conv_out_size(hw, kernel, stride, padding, dilation):
    """Spatial size of a convolution's output (the one place this formula lives in Python).
    Exact for any ints (Python has no overflow); the checks above keep them below 2^31."""
    return [(hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]


def conv_params(op, stride, padding, dilation, groups, pool):
    return (int_pair(op, stride, "stride", 1), int_pair(op, padding, "padding", 0),
            int_pair(op, dilation, "dilation", 1), int_in_range(op, groups, "groups", 1),
            int_in_range(op, pool, "pool", 1))


def weight_for(op, weight, c_in, in_name, groups):
    """weight (C_out, C_in / groups, kH, kW) against ``c_in`` input channels."""
    _value(min(weight.shape) >= 1, op, f"weight must have no zero-sized dimension, got shape {shape_str(weight)}")
    _value(weight.shape[0] % groups == 0, op,
           f"weight has {weight.shape[0]} output channels, not divisible by groups={groups}")
    _value(c_in == weight.shape[1] * groups, op,
           f"{in_name} has {c_in} channels but the weight (shape {shape_str(weight)}, groups={groups}) expects "
           f"{weight.shape[1] * groups}")


def state_size(op, s, name, conv_out, pool):
    want = [c // pool for c in conv_out]
    what = "conv_out_size // pool" if pool > 1 else "conv_out_size"
    _value(list(s.shape[2:]) == want, op, f"{name} has spatial size {list(s.shape[2:])} but {what} is {want}")


def given_conv_out_size(op, conv_out, hw, weight, stride, padding, dilation, what):
    conv_out = int_pair(op, conv_out, "conv_out_size", 0)
    want = conv_out_size(hw, weight.shape[2:], stride, padding, dilation)
    _value(conv_out == want, op, f"conv_out_size {conv_out} does not match the convolution of {what} "
           f"(which gives {want})")
    return conv_out


# -- the ops ---------------------------------------------------------------------------------

def conv_pool_drive_meta(x, weight, bias, stride, padding, dilation, groups, pool):
    """(drive (N, C_out, Hc // pool, Wc // pool), indices of the same shape, int64; pool 1:
    drive (N, C_out, Hc, Wc) and an empty int64 tensor)."""
    op = "conv_pool_drive"
    stride, padding, dilation, groups, pool = conv_params(op, stride, padding, dilation, groups, pool)
    tensor(op, x, "x", 4, " (N, C, H, W)")
    floating(op, x, "x")
    like(op, weight, "weight", x, "x", 4, " (C_out, C_in / groups, kH, kW)")
    weight_for(op, weight, x.shape[1], "x", groups)
    if bias is not None:
        like(op, bias, "bias", x, "x", 1, " (C_out,)")
        _value(bias.shape[0] == weight.shape[0], op,
               f"bias has {bias.shape[0]} entries for {weight.shape[0]} output channels")
    hc, wc = conv_out_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    _value(hc >= pool and wc >= pool, op, f"x of shape {shape_str(x)} gives a {hc}x{wc} convolution output, "
           f"too small for pool={pool}")
    n, c = x.shape[0], weight.shape[0]
    if pool == 1:
        return x.new_empty((n, c, hc, wc)), x.new_empty((0,), dtype=torch.int64)
    shape = (n, c, hc // pool, wc // pool)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


def pool_conv_transpose_meta(s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool):
    """The top-down signal, (N, C_in, *input_size) with C_in = weight.shape[1] * groups."""
    op = "pool_conv_transpose"
    stride, padding, dilation, groups, pool = conv_params(op, stride, padding, dilation, groups, pool)
    tensor(op, s, "s", 4, " (N, C_out, Hp, Wp)")
    floating(op, s, "s")
    like(op, weight, "weight", s, "s", 4, " (C_out, C_in / groups, kH, kW)")
    _value(s.shape[1] == weight.shape[0], op,
           f"s has {s.shape[1]} channels but weight has {weight.shape[0]} output channels")
    weight_for(op, weight, weight.shape[1] * groups, "the input", groups)
    input_size = int_pair(op, input_size, "input_size", 1)
    conv_out = given_conv_out_size(op, conv_out_size, input_size, weight, stride, padding, dilation,
                                   f"an input of size {input_size}")
    state_size(op, s, "s", conv_out, pool)
    if pool > 1:
        index_tensor(op, indices, "indices", s, "s")
    return s.new_empty((s.shape[0], weight.shape[1] * groups, input_size[0], input_size[1]))


def state_update_meta(drive, top_down, nudge, prev, gain, out):
    """The max change (a 0-dim tensor) when ``prev`` is given, else an empty tensor."""
    op = "state_update"
    tensor(op, drive, "drive")
    floating(op, drive, "drive")
    finite_number(op, gain, "gain")
    for name, t in (("top_down", top_down), ("nudge", nudge), ("prev", prev), ("out", out)):
        if t is None and name != "out":
            continue
        like(op, t, name, drive, "drive")
        _value(t.shape == drive.shape, op, f"{name} has shape {shape_str(t)} but drive has {shape_str(drive)}")
    return drive.new_empty(()) if prev is not None else drive.new_empty((0,))


def _same_memory(a, b):
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _may_overlap(a, b):
    """Whether two real tensors may share bytes (same storage, intersecting byte ranges)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        lo = t.storage_offset()
        hi = lo + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
        return lo * t.element_size(), hi * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def check_overlap(drive, top_down, nudge, prev, out):
    """``out`` may be one of the summed operands itself (an in-place update) but must not
    partly overlap any of them, nor overlap ``prev`` at all (the change would be lost).
    Real tensors only (fake and meta tensors have no memory); the C++ kernels check the same."""
    if out.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(out):
        return
    op = "state_update"
    if prev is not None and _may_overlap(out, prev):
        raise ValueError(f"{op}: out overlaps prev in memory (the change would be lost); give out its own buffer")
    for name, t in (("drive", drive), ("top_down", top_down), ("nudge", nudge)):
        if t is not None and _may_overlap(out, t) and not _same_memory(out, t):
            raise ValueError(f"{op}: out partly overlaps {name} in memory; out may be {name} itself (an in-place "
                             "update) or separate memory")


def contrastive_conv_grad_meta(x_a, s_a, idx_a, x_b, s_b, idx_b, conv_out_size, stride, padding, dilation, groups,
                               pool, scale, grad_weight, grad_bias):
    """Nothing (the op accumulates into ``grad_weight`` and ``grad_bias`` in place)."""
    op = "contrastive_conv_grad"
    stride, padding, dilation, groups, pool = conv_params(op, stride, padding, dilation, groups, pool)
    finite_number(op, scale, "scale")
    tensor(op, grad_weight, "grad_weight", 4, " (C_out, C_in / groups, kH, kW)")
    floating(op, grad_weight, "grad_weight")
    for name, t in (("x_a", x_a), ("s_a", s_a), ("x_b", x_b), ("s_b", s_b)):
        like(op, t, name, grad_weight, "grad_weight", 4, " (N, C, H, W)")
    _value(x_a.shape == x_b.shape, op, f"x_a has shape {shape_str(x_a)} but x_b has {shape_str(x_b)}")
    _value(s_a.shape == s_b.shape, op, f"s_a has shape {shape_str(s_a)} but s_b has {shape_str(s_b)}")
    _value(x_a.shape[0] == s_a.shape[0], op, f"x_a has batch {x_a.shape[0]} but s_a has {s_a.shape[0]}")
    weight_for(op, grad_weight, x_a.shape[1], "x_a", groups)
    _value(s_a.shape[1] == grad_weight.shape[0], op,
           f"s_a has {s_a.shape[1]} channels but grad_weight has {grad_weight.shape[0]} output channels")
    conv_out = given_conv_out_size(op, conv_out_size, x_a.shape[2:], grad_weight, stride, padding, dilation, "x_a")
    state_size(op, s_a, "s_a", conv_out, pool)
    if pool > 1:
        index_tensor(op, idx_a, "idx_a", s_a, "s_a")
        index_tensor(op, idx_b, "idx_b", s_b, "s_b")
    if grad_bias is not None:
        like(op, grad_bias, "grad_bias", grad_weight, "grad_weight", 1, " (C_out,)")
        _value(grad_bias.shape[0] == grad_weight.shape[0], op,
               f"grad_bias has {grad_bias.shape[0]} entries for {grad_weight.shape[0]} output channels")
    return None


META = {
    "conv_pool_drive": conv_pool_drive_meta,
    "pool_conv_transpose": pool_conv_transpose_meta,
    "state_update": state_update_meta,
    "contrastive_conv_grad": contrastive_conv_grad_meta,
}
