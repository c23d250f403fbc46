"""Fake (meta) kernels of the compiled ops, and autograd formulas for the two that have one.

Fake kernels compute output metadata (shape, dtype, device, strides) without touching data, so
the ops work with FakeTensors (``torch.compile``, ``torch.export``) and pass
``torch.library.opcheck``. ``csrc/ep_kernels.cpp`` names this module with
``m.set_python_module``, so torch imports it by itself when a fake kernel is needed; the ops
package imports it as soon as the compiled extension is loaded.

Autograd: ``conv_pool_drive`` and ``pool_conv_transpose`` are differentiable (argmax held
fixed, as everywhere in EP), so the compiled ops may sit inside an autograd graph (BPTT).
``state_update`` (it writes into ``out``) and ``contrastive_conv_grad`` (it accumulates into a
gradient) have no autograd formula; their wrappers refuse inputs that require grad.
``pool_conv_transpose``'s ``packed_weight`` is a layout of ``weight`` (no gradient of its own:
pass it only where no gradient is needed, or let the op pack the weight itself).
"""
import torch
import torch.nn.functional as F

from .. import _ext


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check(cond, msg):
    torch._check(cond, lambda: msg)


def _conv_pool_drive_fake(x, weight, bias, stride, padding, dilation, groups, pool):
    _check(x.dim() == 4 and weight.dim() == 4, "conv_pool_drive: x and weight must be 4-D")
    _check(x.dtype == weight.dtype, "conv_pool_drive: weight dtype differs from x's")
    _check(x.shape[1] == weight.shape[1] * groups, "conv_pool_drive: channel mismatch between x and weight")
    _check(pool >= 1, "conv_pool_drive: pool must be >= 1")
    hc = _conv_out(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wc = _conv_out(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    _check(hc >= pool and wc >= pool, "conv_pool_drive: convolution output too small for the pool")
    n, c = x.shape[0], weight.shape[0]
    if pool == 1:
        return x.new_empty((n, c, hc, wc)), x.new_empty((0,), dtype=torch.int64)
    shape = (n, c, hc // pool, wc // pool)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


def _pool_conv_transpose_fake(s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups,
                              pool, packed_weight=None):
    _check(s.dim() == 4 and weight.dim() == 4, "pool_conv_transpose: s and weight must be 4-D")
    _check(s.dtype == weight.dtype, "pool_conv_transpose: weight dtype differs from s's")
    _check(s.shape[1] == weight.shape[0], "pool_conv_transpose: s channels != weight output channels")
    if pool > 1:
        _check(indices.shape == s.shape and indices.dtype == torch.int64,
               "pool_conv_transpose: indices must be int64 with the shape of s")
    return s.new_empty((s.shape[0], weight.shape[1] * groups, input_size[0], input_size[1]))


def packed_numel(weight_shape, dtype):
    """Elements of pack_top_down_weight(weight): [chunk][C_out][kh*kw][cw], cw input channels
    per chunk (one 64-byte vector if the group's input channels fit, else two)."""
    c_out, cig, kh, kw = weight_shape
    lanes = 64 // torch.empty((), dtype=dtype).element_size()
    cw = lanes if cig <= lanes else 2 * lanes
    return ((cig + cw - 1) // cw) * c_out * kh * kw * cw


def _pack_top_down_weight_fake(weight):
    _check(weight.dim() == 4, "pack_top_down_weight: weight must be 4-D")
    _check(weight.dtype in (torch.float32, torch.float64), "pack_top_down_weight: float32/float64 only")
    return weight.new_empty((packed_numel(tuple(weight.shape), weight.dtype),))


def _state_update_fake(drive, top_down, nudge, prev, gain, out):
    _check(out.shape == drive.shape and out.dtype == drive.dtype, "state_update: out must match drive")
    if prev is None:
        return drive.new_empty((0,))
    return drive.new_empty(())


def _contrastive_conv_grad_fake(x_a, s_a, idx_a, x_b, s_b, idx_b, conv_out_size, stride, padding, dilation,
                                groups, pool, scale, grad_weight, grad_bias):
    _check(x_a.shape == x_b.shape and s_a.shape == s_b.shape,
           "contrastive_conv_grad: the two states must have equal shapes")
    return None


# --- autograd (argmax positions are constants) ---------------------------------------------

def _unpool(g, idx, pool, conv_out_size):
    if pool == 1:
        return g
    return F.max_unpool2d(g, idx, pool, pool, output_size=list(conv_out_size))


def _gather_pooled(u, idx, pool):
    """Inverse of the unpool: the values of ``u`` (N, C, Hc, Wc) at the argmax positions."""
    if pool == 1:
        return u
    return u.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


def _cpd_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, pool = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.conf = (list(stride), list(padding), list(dilation), groups, pool, bias is not None)


def _cpd_backward(ctx, grad_drive, grad_idx):
    if grad_drive is None:
        return (None,) * 8
    x, weight, idx = ctx.saved_tensors
    stride, padding, dilation, groups, pool, has_bias = ctx.conf
    hc = _conv_out(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wc = _conv_out(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    gy = _unpool(grad_drive, idx, pool, (hc, wc))
    need = ctx.needs_input_grad
    gx, gw, gb = torch.ops.aten.convolution_backward(
        gy, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False, [0, 0], groups,
        [need[0], need[1], has_bias and need[2]])
    return gx, gw, gb, None, None, None, None, None


def _pct_setup(ctx, inputs, output):
    s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool = inputs[:10]
    ctx.save_for_backward(s, indices, weight)
    ctx.conf = (list(conv_out_size), list(stride), list(padding), list(dilation), groups, pool)


def _pct_backward(ctx, grad_out):
    if grad_out is None:
        return (None,) * 11
    s, indices, weight = ctx.saved_tensors
    conv_out_size, stride, padding, dilation, groups, pool = ctx.conf
    gs = gw = None
    if ctx.needs_input_grad[0]:
        # d/ds <g, W^T * U(s)> = P_idx(W * g): the convolution of g read at the argmax positions.
        gu = F.conv2d(grad_out, weight, None, stride, padding, dilation, groups)
        gs = _gather_pooled(gu, indices, pool)
    if ctx.needs_input_grad[2]:
        u = _unpool(s, indices, pool, conv_out_size)
        gw = torch.nn.grad.conv2d_weight(grad_out, weight.shape, u, stride, padding, dilation, groups)
    return gs, None, gw, None, None, None, None, None, None, None, None


_REGISTERED = False


def register():
    """Register the fake kernels and autograd formulas (once; needs the compiled library)."""
    global _REGISTERED
    if _REGISTERED or not _ext.compiled_available():
        return
    torch.library.register_fake("ep_kernels::conv_pool_drive", _conv_pool_drive_fake)
    torch.library.register_fake("ep_kernels::pool_conv_transpose", _pool_conv_transpose_fake)
    torch.library.register_fake("ep_kernels::pack_top_down_weight", _pack_top_down_weight_fake)
    torch.library.register_fake("ep_kernels::state_update", _state_update_fake)
    torch.library.register_fake("ep_kernels::contrastive_conv_grad", _contrastive_conv_grad_fake)
    torch.library.register_autograd("ep_kernels::conv_pool_drive", _cpd_backward, setup_context=_cpd_setup)
    torch.library.register_autograd("ep_kernels::pool_conv_transpose", _pct_backward, setup_context=_pct_setup)
    _REGISTERED = True


register()
