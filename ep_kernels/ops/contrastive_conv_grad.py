"""The contrastive weight update of a conv synapse, both states in one call.

``grad_weight += scale * (dPhi/dW(x_a, s_a) - dPhi/dW(x_b, s_b))`` and likewise for the
bias, where ``dPhi/dW(x, s)`` is the convolution weight-gradient with input ``x`` and
output-gradient ``U(s)`` (``s`` max-unpooled to its argmax positions), summed over the
batch, and ``dPhi/db`` is the per-channel sum of ``s``. With ``scale = -1/(2 beta N)`` and
(a, b) = (s+, s-) this is the symmetric EP estimate, accumulated in place like autograd.
"""
import torch
import torch.nn.functional as F

from ._common import check_float, check_tensor, compiled_op, dispatch, pair


def _phi_grad_weight(x, s, idx, weight_shape, conv_out_size, stride, padding, dilation, groups, pool):
    u = F.max_unpool2d(s, idx, pool, pool, output_size=list(conv_out_size)) if pool > 1 else s
    return torch.nn.grad.conv2d_weight(x, weight_shape, u, stride, padding, dilation, groups)


def contrastive_conv_grad_ref(x_a, s_a, idx_a, x_b, s_b, idx_b, conv_out_size, stride, padding, dilation,
                              groups, pool, scale, grad_weight, grad_bias):
    shape = grad_weight.shape
    ga = _phi_grad_weight(x_a, s_a, idx_a, shape, conv_out_size, stride, padding, dilation, groups, pool)
    gb = _phi_grad_weight(x_b, s_b, idx_b, shape, conv_out_size, stride, padding, dilation, groups, pool)
    grad_weight.add_(ga - gb, alpha=scale)
    if grad_bias is not None:
        grad_bias.add_(s_a.sum((0, 2, 3)) - s_b.sum((0, 2, 3)), alpha=scale)


def contrastive_conv_grad(x_a, s_a, idx_a, x_b, s_b, idx_b, conv_out_size, stride, padding, dilation,
                          groups, pool, scale, grad_weight, grad_bias=None):
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    conv_out_size = pair(conv_out_size, "conv_out_size")
    check_tensor(grad_weight, "grad_weight", ndim=4)
    check_float(grad_weight, "grad_weight")
    dev, dt = grad_weight.device, grad_weight.dtype
    for name, t in (("x_a", x_a), ("s_a", s_a), ("x_b", x_b), ("s_b", s_b)):
        check_tensor(t, name, ndim=4, dtype=dt, device=dev)
    if x_a.shape != x_b.shape or s_a.shape != s_b.shape:
        raise ValueError("the two states must have the same shapes")
    if pool > 1:
        for name, t in (("idx_a", idx_a), ("idx_b", idx_b)):
            check_tensor(t, name, ndim=4, dtype=torch.int64, device=dev)
            if t.shape != s_a.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} != state shape {tuple(s_a.shape)}")
    if grad_bias is not None:
        check_tensor(grad_bias, "grad_bias", ndim=1, dtype=dt, device=dev)
    if dispatch(dev) == "reference":
        return contrastive_conv_grad_ref(x_a, s_a, idx_a, x_b, s_b, idx_b, conv_out_size, stride, padding,
                                         dilation, groups, pool, float(scale), grad_weight, grad_bias)
    compiled_op("contrastive_conv_grad")(x_a, s_a, idx_a, x_b, s_b, idx_b, conv_out_size, stride, padding,
                                         dilation, groups, pool, float(scale), grad_weight, grad_bias)
