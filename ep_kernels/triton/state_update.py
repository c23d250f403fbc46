"""Triton ``state_update``: ``out = clamp(gain * (drive + top_down + nudge), 0, 1)`` and
``max |out - prev|`` in one pass (docs/design.md, "state_update").

Each program handles ``BLOCK`` elements and writes its block's max change (NaN if any change
is NaN) to a partial buffer; ``torch.max`` of the partials (NaN-propagating) gives the
0-dim result. Same operation order as the reference (adds, then the multiplication; clamp by
selects so NaN is kept), so float32/float64 results are bitwise equal; 16-bit inputs compute
in float32 and round once at the store.
"""
import torch
import triton
import triton.language as tl

from ._launch import cdiv, check_device, launch, scalar, tl_compute, tl_storage, to_storage

BLOCK = 1024


@triton.jit
def _state_update_kernel(drive_ptr, td_ptr, nudge_ptr, prev_ptr, out_ptr, partial_ptr, gain_ptr, n,
                         HAS_TD: tl.constexpr, HAS_NUDGE: tl.constexpr, HAS_PREV: tl.constexpr,
                         COMPUTE: tl.constexpr, STORE: tl.constexpr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(drive_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_TD:
        v = v + tl.load(td_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_NUDGE:
        v = v + tl.load(nudge_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    gain = tl.load(gain_ptr).to(COMPUTE)
    v = v * gain
    # clamp(v, 0, 1) keeping NaN (both comparisons are false for NaN)
    v = tl.where(v < 0.0, 0.0, v)
    v = tl.where(v > 1.0, 1.0, v)
    o = to_storage(v, STORE, IS_BF16)
    tl.store(out_ptr + offs, o, mask=mask)
    if HAS_PREV:
        p = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        d = tl.abs(o.to(COMPUTE) - p)
        d = tl.where(mask, d, 0.0)
        is_nan = d != d
        any_nan = tl.max(is_nan.to(tl.int32), axis=0)
        m = tl.max(tl.where(is_nan, 0.0, d), axis=0)
        m = tl.where(any_nan > 0, float("nan"), m)
        tl.store(partial_ptr + pid, m)


def state_update(drive, top_down, nudge, prev, gain, out):
    """Same contract as ``ep_kernels.ops.state_update`` (arguments already checked)."""
    check_device(drive)
    d = drive.contiguous()
    td = top_down.contiguous() if top_down is not None else None
    nu = nudge.contiguous() if nudge is not None else None
    pr = prev.contiguous() if prev is not None else None
    o = out if out.is_contiguous() else torch.empty_like(d)
    n = d.numel()
    cdt = torch.float64 if d.dtype == torch.float64 else torch.float32
    nblocks = max(1, cdiv(n, BLOCK))
    partial = torch.empty(nblocks if pr is not None else 1, dtype=cdt, device=d.device)
    if n > 0:
        launch(_state_update_kernel, (nblocks,),
               (d, td if td is not None else d, nu if nu is not None else d, pr if pr is not None else d, o,
                partial, scalar(gain, d.dtype, d.device), n),
               dict(HAS_TD=td is not None, HAS_NUDGE=nu is not None, HAS_PREV=pr is not None,
                    COMPUTE=tl_compute(d.dtype), STORE=tl_storage(d.dtype), IS_BF16=d.dtype == torch.bfloat16,
                    BLOCK=BLOCK))
    elif pr is not None:
        partial.zero_()
    if o is not out:
        out.copy_(o)
    if pr is None:
        return torch.empty(0, dtype=out.dtype, device=out.device)
    return partial.max().to(out.dtype)
