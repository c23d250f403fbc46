"""Autograd formulas of ``conv_pool_drive`` and ``pool_conv_transpose`` (the argmax positions
are constants, as everywhere in EP), registered for the compiled ops and the Triton ops alike
(``ep_kernels.ops._library``), so either may sit inside an autograd graph (BPTT).

``state_update`` (it writes into ``out``) and ``contrastive_conv_grad`` (it accumulates into a
gradient) have no autograd formula; their wrappers refuse inputs that require grad.
"""
import torch
import torch.nn.functional as F

from .._conv import conv2d
from ._meta import conv_out_size as conv_output_size


def _unpool(g, idx, pool, conv_out_size):
    if pool == 1:
        return g
    return F.max_unpool2d(g, idx, pool, pool, output_size=list(conv_out_size))


def _gather_pooled(u, idx, pool):
    """Inverse of the unpool: the values of ``u`` (N, C, Hc, Wc) at the argmax positions."""
    if pool == 1:
        return u
    return u.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


def conv_pool_drive_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, pool = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.conf = (list(stride), list(padding), list(dilation), groups, pool, bias is not None)


def conv_pool_drive_backward(ctx, grad_drive, grad_idx):
    if grad_drive is None:
        return (None,) * 8
    x, weight, idx = ctx.saved_tensors
    stride, padding, dilation, groups, pool, has_bias = ctx.conf
    gy = _unpool(grad_drive, idx, pool, conv_output_size(x.shape[2:], weight.shape[2:], stride, padding, dilation))
    need = ctx.needs_input_grad
    gx, gw, gb = torch.ops.aten.convolution_backward(
        gy, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False, [0, 0], groups,
        [need[0], need[1], has_bias and need[2]])
    return gx, gw, gb, None, None, None, None, None


def pool_conv_transpose_setup(ctx, inputs, output):
    s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool = inputs[:10]
    ctx.save_for_backward(s, indices, weight)
    ctx.conf = (list(conv_out_size), list(stride), list(padding), list(dilation), groups, pool)


def pool_conv_transpose_backward(ctx, grad_out):
    if grad_out is None:
        return (None,) * 10
    s, indices, weight = ctx.saved_tensors
    conv_out_size, stride, padding, dilation, groups, pool = ctx.conf
    gs = gw = None
    if ctx.needs_input_grad[0]:
        # d/ds <g, W^T * U(s)> = P_idx(W * g): the convolution of g read at the argmax positions.
        gu = conv2d(grad_out, weight, None, stride, padding, dilation, groups)
        gs = _gather_pooled(gu, indices, pool)
    if ctx.needs_input_grad[2]:
        u = _unpool(s, indices, pool, conv_out_size)
        gw = torch.nn.grad.conv2d_weight(grad_out, weight.shape, u, stride, padding, dilation, groups)
    return gs, None, gw, None, None, None, None, None, None, None
