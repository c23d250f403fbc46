"""Triton ``contrastive_conv_grad``: ``grad_weight += scale * (dW(x_a, U(s_a)) - dW(x_b, U(s_b)))``
for both states in one kernel, accumulated into ``grad_weight`` in place (docs/design.md,
"contrastive_conv_grad").

An implicit GEMM per group: rows are output channels co, columns are (ci, i, j) of the weight,
and the reduction runs over the pooled positions (n, ph, pw) of both states, with the k x k
window offsets (r, q) unrolled: the state and its argmax are loaded once per pooled block and
each window offset keeps the channels whose argmax is there
(``A[co, p] = s[n, co, ph, pw] if idx == (ph k + r) * W_conv + pw k + q else 0``), times the
input read at that position and tap (``B[p, (ci, i, j)] = x[n, ci, (ph k + r) * stride - pad +
i * dil, ...]``). State b enters with its sign flipped, so one accumulator holds the
difference; when both states read the same input (``x_a is x_b``, e.g. the first layer) the
two unpooled maps are subtracted before the product and the reduction runs once.

Each program owns its tile of ``grad_weight`` (no atomics: deterministic) and adds
``scale * acc`` to it. The bias gradient (a per-channel sum) is plain torch.
"""
import torch
import triton
import triton.language as tl

from ._launch import cdiv, check_device, dot_in_f32, dot_precision, launch, scalar, tl_compute, tl_storage, \
    to_storage


def _config(dtype):
    # num_stages=1: the k x k unrolled window offsets already overlap their loads, and deeper
    # software pipelining of all of them would need more shared memory than a block has.
    if dtype == torch.float64:
        return dict(BLOCK_CO=32, BLOCK_N=32, BLOCK_P=16, num_warps=4, num_stages=1)
    return dict(BLOCK_CO=64, BLOCK_N=64, BLOCK_P=32, num_warps=4, num_stages=1)


@triton.jit
def _accumulate(acc, x_ptr, s_ptr, idx_ptr, s2_ptr, idx2_ptr, co, co_mask, ci, kh_i, kw_j, n_mask, pp,
                g, NP, CIN, H, W, COUT, HP, WP, WC, CIG, COG, SH, SW, PH, PW, DH, DW,
                SIGN: tl.constexpr, DIFF: tl.constexpr, POOL: tl.constexpr, COMPUTE: tl.constexpr,
                DOT_F32: tl.constexpr, PREC: tl.constexpr, BLOCK_P: tl.constexpr):
    cabs = (g * COG + co).to(tl.int64)
    for p0 in range(0, NP, BLOCK_P):
        p = p0 + pp
        p_mask = p < NP
        pw = p % WP
        t = p // WP
        ph = t % HP
        n = t // HP
        soff = cabs[:, None] * (HP * WP) + (n * (COUT * HP * WP) + ph * WP + pw)[None, :]
        smask = co_mask[:, None] & p_mask[None, :]
        sv = tl.load(s_ptr + soff, mask=smask, other=0.0)
        if DOT_F32:  # 16-bit values: to float32 right after loading (the interpreter needs it)
            sv = sv.to(COMPUTE)
        if POOL > 1:
            iv = tl.load(idx_ptr + soff, mask=smask, other=-1)
        if DIFF:
            sv2 = tl.load(s2_ptr + soff, mask=smask, other=0.0)
            if DOT_F32:
                sv2 = sv2.to(COMPUTE)
            if POOL > 1:
                iv2 = tl.load(idx2_ptr + soff, mask=smask, other=-1)
        if SIGN < 0:
            sv = -sv
            if DIFF:
                sv2 = -sv2
        for r in tl.static_range(POOL):
            for q in tl.static_range(POOL):
                yc = ph * POOL + r
                xc = pw * POOL + q
                if POOL > 1:
                    target = yc * WC + xc
                    a = tl.where(iv == target[None, :], sv, 0.0)
                    if DIFF:
                        a = a - tl.where(iv2 == target[None, :], sv2, 0.0)
                else:
                    a = sv
                    if DIFF:
                        a = a - sv2
                yy = yc[:, None] * SH - PH + kh_i[None, :] * DH
                xx = xc[:, None] * SW - PW + kw_j[None, :] * DW
                xmask = p_mask[:, None] & n_mask[None, :] & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
                xoff = (n * (CIN * H * W))[:, None] + ((g * CIG + ci).to(tl.int64) * (H * W))[None, :] + yy * W + xx
                b = tl.load(x_ptr + xoff, mask=xmask, other=0.0)
                if DOT_F32:
                    b = b.to(COMPUTE)
                acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=COMPUTE)
    return acc


@triton.jit
def _contrastive_kernel(x_a_ptr, s_a_ptr, idx_a_ptr, x_b_ptr, s_b_ptr, idx_b_ptr, gw_ptr, scale_ptr,
                        N, CIN, H, W, COUT, HP, WP, WC, CIG, COG, KH, KW, SH, SW, PH, PW, DH, DW,
                        SAME_X: tl.constexpr, POOL: tl.constexpr, COMPUTE: tl.constexpr, STORE: tl.constexpr,
                        IS_BF16: tl.constexpr, DOT_F32: tl.constexpr,
                        PREC: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    pid_co = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = co < COG
    col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (ci, i, j) flattened
    n_mask = col < CIG * KH * KW
    ci = col // (KH * KW)
    rem = col % (KH * KW)
    kh_i = rem // KW
    kw_j = rem % KW
    pp = tl.arange(0, BLOCK_P)
    NP = N * HP * WP
    acc = tl.zeros((BLOCK_CO, BLOCK_N), dtype=COMPUTE)
    if SAME_X:
        acc = _accumulate(acc, x_a_ptr, s_a_ptr, idx_a_ptr, s_b_ptr, idx_b_ptr, co, co_mask, ci, kh_i, kw_j, n_mask,
                          pp, g, NP, CIN, H, W, COUT, HP, WP, WC, CIG, COG, SH, SW, PH, PW, DH, DW,
                          1, True, POOL, COMPUTE, DOT_F32, PREC, BLOCK_P)
    else:
        acc = _accumulate(acc, x_a_ptr, s_a_ptr, idx_a_ptr, s_a_ptr, idx_a_ptr, co, co_mask, ci, kh_i, kw_j,
                          n_mask, pp, g, NP, CIN, H, W, COUT, HP, WP, WC, CIG, COG, SH, SW, PH, PW, DH, DW,
                          1, False, POOL, COMPUTE, DOT_F32, PREC, BLOCK_P)
        acc = _accumulate(acc, x_b_ptr, s_b_ptr, idx_b_ptr, s_b_ptr, idx_b_ptr, co, co_mask, ci, kh_i, kw_j,
                          n_mask, pp, g, NP, CIN, H, W, COUT, HP, WP, WC, CIG, COG, SH, SW, PH, PW, DH, DW,
                          -1, False, POOL, COMPUTE, DOT_F32, PREC, BLOCK_P)
    scale = tl.load(scale_ptr).to(COMPUTE)
    goff = (g * COG + co).to(tl.int64)[:, None] * (CIG * KH * KW) + col[None, :]
    gmask = co_mask[:, None] & n_mask[None, :]
    old = tl.load(gw_ptr + goff, mask=gmask, other=0.0).to(COMPUTE)
    tl.store(gw_ptr + goff, to_storage(old + scale * acc, STORE, IS_BF16), mask=gmask)


def _same_data(a, b):
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device)


def contrastive_conv_grad(x_a, s_a, idx_a, x_b, s_b, idx_b, conv_out_size, stride, padding, dilation, groups, pool,
                          scale, grad_weight, grad_bias):
    """Same contract as ``ep_kernels.ops.contrastive_conv_grad`` (arguments already checked)."""
    check_device(grad_weight)
    same_x = _same_data(x_a, x_b)
    xa = x_a.contiguous()
    xb = xa if same_x else x_b.contiguous()
    sa, sb = s_a.contiguous(), s_b.contiguous()
    ia = idx_a.contiguous() if pool > 1 else sa
    ib = idx_b.contiguous() if pool > 1 else sb
    n, cin, h, w = xa.shape
    cout, hp, wp = sa.shape[1], sa.shape[2], sa.shape[3]
    cig, kh, kw = grad_weight.shape[1], grad_weight.shape[2], grad_weight.shape[3]
    gw = grad_weight if grad_weight.is_contiguous() else grad_weight.contiguous()
    cfg = _config(gw.dtype)
    if n * hp * wp > 0 and gw.numel() > 0:
        grid = (cdiv(cout // groups, cfg["BLOCK_CO"]), cdiv(cig * kh * kw, cfg["BLOCK_N"]), groups)
        launch(_contrastive_kernel, grid,
               (xa, sa, ia, xb, sb, ib, gw, scalar(scale, gw.dtype, gw.device),
                n, cin, h, w, cout, hp, wp, conv_out_size[1], cig, cout // groups, kh, kw,
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]),
               dict(SAME_X=same_x, POOL=pool, COMPUTE=tl_compute(gw.dtype), STORE=tl_storage(gw.dtype),
                    IS_BF16=gw.dtype == torch.bfloat16, DOT_F32=dot_in_f32(gw.dtype),
                    PREC=dot_precision(gw.dtype), **cfg))
    if gw is not grad_weight:
        grad_weight.copy_(gw)
    if grad_bias is not None:
        grad_bias.add_(s_a.sum((0, 2, 3)) - s_b.sum((0, 2, 3)), alpha=scale)
