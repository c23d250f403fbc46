"""Triton ``conv_pool_drive``: the convolution by torch (cuDNN on a GPU), then one Triton
epilogue that adds the bias, max-pools k x k (stride k) and writes the argmax: the
full-resolution output is read once and never written again (docs/design.md, "conv_pool_drive").

Winner rule as ``F.max_pool2d``: a value wins if it is greater than the best so far or is
NaN, scanning the window in row-major order (ties go to the first position; the last NaN of
a window wins). Indices are flat positions in the (H_conv x W_conv) plane.

Bias: on CUDA tensors the convolution runs without it and the epilogue adds it (ATen's cuDNN
path adds the bias as a separate pass after the convolution, so the values are the same);
elsewhere (the interpreter on CPU) the convolution adds it exactly as the reference does,
because CPU convolutions may fold the bias in with another rounding. 16-bit values: the
biased value is rounded to the storage type before comparing, as the reference compares
stored values.
"""
import torch
import triton
import triton.language as tl

from .._conv import conv2d
from ._launch import cdiv, check_device, launch, tl_compute, tl_storage, to_storage

BLOCK = 256


@triton.jit
def _pool_argmax_kernel(y_ptr, bias_ptr, out_ptr, idx_ptr, total, C, HC, WC, HP, WP,
                        K: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND: tl.constexpr, COMPUTE: tl.constexpr,
                        STORE: tl.constexpr, IS_BF16: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    pw = offs % WP
    t = offs // WP
    ph = t % HP
    plane = t // HP  # n * C + c
    base = plane * HC * WC
    if HAS_BIAS:
        b = tl.load(bias_ptr + plane % C, mask=mask, other=0.0).to(COMPUTE)
    pos0 = (ph * K) * WC + pw * K
    best = tl.load(y_ptr + base + pos0, mask=mask, other=0.0).to(COMPUTE)
    if HAS_BIAS:
        best = best + b
        if ROUND:
            best = to_storage(best, STORE, IS_BF16).to(COMPUTE)
    code = pos0
    for r in tl.static_range(K):
        for q in tl.static_range(K):
            if r + q > 0:
                pos = (ph * K + r) * WC + pw * K + q
                v = tl.load(y_ptr + base + pos, mask=mask, other=0.0).to(COMPUTE)
                if HAS_BIAS:
                    v = v + b
                    if ROUND:
                        v = to_storage(v, STORE, IS_BF16).to(COMPUTE)
                take = (v > best) | (v != v)
                best = tl.where(take, v, best)
                code = tl.where(take, pos, code)
    tl.store(out_ptr + offs, to_storage(best, STORE, IS_BF16), mask=mask)
    tl.store(idx_ptr + offs, code.to(tl.int64), mask=mask)


def pool_argmax(y, bias, pool):
    """``max_pool2d(y + bias[:, None, None], pool, return_indices=True)`` of a conv output
    ``y`` (N, C, H_conv, W_conv); ``bias`` may be None."""
    check_device(y)
    y = y.contiguous()
    n, c, hc, wc = y.shape
    hp, wp = hc // pool, wc // pool
    out = torch.empty((n, c, hp, wp), dtype=y.dtype, device=y.device)
    idx = torch.empty((n, c, hp, wp), dtype=torch.int64, device=y.device)
    total = out.numel()
    if total > 0:
        launch(_pool_argmax_kernel, (cdiv(total, BLOCK),),
               (y, bias if bias is not None else y, out, idx, total, c, hc, wc, hp, wp),
               dict(K=pool, HAS_BIAS=bias is not None, ROUND=y.dtype in (torch.bfloat16, torch.float16),
                    COMPUTE=tl_compute(y.dtype), STORE=tl_storage(y.dtype), IS_BF16=y.dtype == torch.bfloat16,
                    BLOCK=BLOCK))
    return out, idx


def conv_pool_drive(x, weight, bias, stride, padding, dilation, groups, pool):
    """Same contract as ``ep_kernels.ops.conv_pool_drive`` (arguments already checked)."""
    check_device(x)
    if pool == 1:
        y = conv2d(x, weight, bias, stride, padding, dilation, groups)
        return y, torch.empty(0, dtype=torch.int64, device=x.device)
    fuse_bias = bias is not None and x.device.type == "cuda"
    y = conv2d(x, weight, None if fuse_bias else bias, stride, padding, dilation, groups)
    return pool_argmax(y, bias if fuse_bias else None, pool)
