"""Triton ``pool_conv_transpose``: the top-down signal ``W^T * U(s)`` through a max-pool and a
convolution, as one implicit GEMM whose A operand is the max-unpooled state built on the fly
from ``(s, indices)``: the full-resolution unpooled map is never written (docs/design.md,
"pool_conv_transpose").

Output element (n, ci, y, x) = sum over kernel taps (i, j) and the group's output channels co
of ``W[co, ci, i, j] * U[n, co, yc, xc]``, where (yc, xc) is the convolution position that tap
(i, j) of (y, x) reads (``y = yc * stride - padding + i * dilation``), and
``U[n, co, yc, xc] = s[n, co, yc // k, xc // k]`` if that window's argmax is (yc, xc), else 0.
Tiles: BLOCK_M output positions (n, y, x) x BLOCK_C input channels; the reduction runs over
taps and blocks of BLOCK_K output channels with ``tl.dot``.

Why not a GEMM over pooled positions only (1/k^2 of the work): each output channel has its
own argmax position, so after the contraction over output channels the target positions are
no longer common; the sparse form is a scatter of rank-1 updates (the CPU kernel does that).
On tensor cores the dense implicit GEMM with the unpooling fused into the operand loads is
the faster of the two.

Indices must be those of a k x k max-pool of stride k (each inside its own window), as
``conv_pool_drive`` returns them; an index outside its window contributes nothing here.
"""
import torch
import triton
import triton.language as tl

from ._launch import cdiv, check_device, dot_in_f32, dot_precision, launch, tl_compute, tl_storage, to_storage


def _config(dtype):
    if dtype == torch.float64:
        return dict(BLOCK_M=32, BLOCK_C=32, BLOCK_K=16, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_C=64, BLOCK_K=32, num_warps=4)


@triton.jit
def _pool_conv_transpose_kernel(s_ptr, idx_ptr, w_ptr, out_ptr,
                                N, CIN, H, W, COUT, HS, WS, HC, WC, HCE, WCE, CIG, COG,
                                KH, KW, SH, SW, PH, PW, DH, DW,
                                POOL: tl.constexpr, COMPUTE: tl.constexpr, STORE: tl.constexpr, IS_BF16: tl.constexpr,
                                DOT_F32: tl.constexpr,
                                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    nblk_c = tl.cdiv(CIG, BLOCK_C)
    g = pid_c // nblk_c
    cb = pid_c % nblk_c
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < N * H * W
    xo = m % W
    t = m // W
    yo = t % H
    n = t // H
    ci = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ci_mask = ci < CIG
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=COMPUTE)
    for i in range(KH):
        for j in range(KW):
            yy = yo + PH - i * DH
            xx = xo + PW - j * DW
            ok = m_mask & (yy >= 0) & (xx >= 0)
            yy = tl.where(ok, yy, 0)
            xx = tl.where(ok, xx, 0)
            ok = ok & (yy % SH == 0) & (xx % SW == 0)
            yc = yy // SH
            xc = xx // SW
            ok = ok & (yc < HCE) & (xc < WCE)
            pos_s = (yc // POOL) * WS + (xc // POOL)  # position in the plane of s
            target = yc * WC + xc  # position in the convolution plane (what indices hold)
            row = n * COUT * HS * WS + pos_s
            for co0 in range(0, COG, BLOCK_K):
                co = co0 + kk
                co_mask = co < COG
                cabs = g * COG + co
                off = row[:, None] + cabs[None, :].to(tl.int64) * (HS * WS)
                amask = ok[:, None] & co_mask[None, :]
                a = tl.load(s_ptr + off, mask=amask, other=0.0)
                if DOT_F32:  # 16-bit values: to float32 right after loading (the interpreter needs it)
                    a = a.to(COMPUTE)
                if POOL > 1:
                    iv = tl.load(idx_ptr + off, mask=amask, other=-1)
                    a = tl.where(iv == target[:, None], a, 0.0)
                woff = cabs[:, None].to(tl.int64) * (CIG * KH * KW) + ci[None, :] * (KH * KW) + i * KW + j
                b = tl.load(w_ptr + woff, mask=co_mask[:, None] & ci_mask[None, :], other=0.0)
                if DOT_F32:
                    b = b.to(COMPUTE)
                acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=COMPUTE)
    ooff = (n[:, None] * CIN + (g * CIG + ci)[None, :]) * (H * W) + (yo * W + xo)[:, None]
    tl.store(out_ptr + ooff, to_storage(acc, STORE, IS_BF16), mask=m_mask[:, None] & ci_mask[None, :])


def pool_conv_transpose(s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool,
                        packed_weight=None):
    """Same contract as ``ep_kernels.ops.pool_conv_transpose`` (arguments already checked;
    ``packed_weight`` is the CPU kernel's layout and is ignored)."""
    check_device(s)
    s = s.contiguous()
    w = weight.contiguous()
    idx = indices.contiguous() if pool > 1 else s
    n, cout, hs, ws = s.shape
    cig, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    cin = cig * groups
    h, wd = input_size
    hc, wc = conv_out_size
    hce, wce = (hs * pool, ws * pool) if pool > 1 else (hc, wc)
    out = torch.empty((n, cin, h, wd), dtype=s.dtype, device=s.device)
    if out.numel() == 0:
        return out
    cfg = _config(s.dtype)
    grid = (cdiv(n * h * wd, cfg["BLOCK_M"]), groups * cdiv(cig, cfg["BLOCK_C"]))
    launch(_pool_conv_transpose_kernel, grid,
           (s, idx, w, out, n, cin, h, wd, cout, hs, ws, hc, wc, hce, wce, cig, cout // groups,
            kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]),
           dict(POOL=pool, COMPUTE=tl_compute(s.dtype), STORE=tl_storage(s.dtype), IS_BF16=s.dtype == torch.bfloat16,
                DOT_F32=dot_in_f32(s.dtype), PREC=dot_precision(s.dtype),
                **cfg))
    return out
