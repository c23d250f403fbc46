"""The contrastive weight update of a conv synapse, both states in one call.

``grad_weight += scale * (dPhi/dW(x_a, s_a) - dPhi/dW(x_b, s_b))`` and likewise for the
bias, where ``dPhi/dW(x, s)`` is the convolution weight-gradient with input ``x`` and
output-gradient ``U(s)`` (``s`` max-unpooled to its argmax positions), summed over the
batch, and ``dPhi/db`` is the per-channel sum of ``s``. With ``scale = -1/(2 beta N)`` and
(a, b) = (s+, s-) this is the symmetric EP estimate, accumulated in place like autograd.
"""
import torch
import torch.nn.functional as F

from ._common import check_conv_params, check_float, check_no_grad, check_tensor, compiled_op, \
    conv_out_size as _conv_out, dispatch, pair, triton_op


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
    check_conv_params(stride, padding, dilation, groups, pool)
    check_tensor(grad_weight, "grad_weight", ndim=4)
    check_float(grad_weight, "grad_weight")
    dev, dt = grad_weight.device, grad_weight.dtype
    for name, t in (("x_a", x_a), ("s_a", s_a), ("x_b", x_b), ("s_b", s_b)):
        check_tensor(t, name, ndim=4, dtype=dt, device=dev)
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a shape {tuple(x_a.shape)} != x_b shape {tuple(x_b.shape)}")
    if s_a.shape != s_b.shape:
        raise ValueError(f"s_a shape {tuple(s_a.shape)} != s_b shape {tuple(s_b.shape)}")
    if x_a.shape[0] != s_a.shape[0]:
        raise ValueError(f"x_a has batch {x_a.shape[0]} but s_a has {s_a.shape[0]}")
    if x_a.shape[1] != grad_weight.shape[1] * groups:
        raise ValueError(f"x_a has {x_a.shape[1]} channels but grad_weight {tuple(grad_weight.shape)} with "
                         f"groups={groups} expects {grad_weight.shape[1] * groups}")
    if s_a.shape[1] != grad_weight.shape[0]:
        raise ValueError(f"s_a has {s_a.shape[1]} channels but grad_weight has {grad_weight.shape[0]} "
                         "output channels")
    expected = _conv_out(x_a.shape[2:], grad_weight.shape[2:], stride, padding, dilation)
    if list(conv_out_size) != expected:
        raise ValueError(f"conv_out_size {list(conv_out_size)} does not match the convolution of x_a "
                         f"(which gives {expected})")
    exp_s = [c // pool for c in conv_out_size]
    if list(s_a.shape[2:]) != exp_s:
        raise ValueError(f"s_a spatial size {tuple(s_a.shape[2:])} != conv_out_size // pool = {tuple(exp_s)}")
    if pool > 1:
        for name, t in (("idx_a", idx_a), ("idx_b", idx_b)):
            check_tensor(t, name, ndim=4, dtype=torch.int64, device=dev)
            if t.shape != s_a.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} != state shape {tuple(s_a.shape)}")
    if grad_bias is not None:
        check_tensor(grad_bias, "grad_bias", ndim=1, dtype=dt, device=dev)
        if grad_bias.shape[0] != grad_weight.shape[0]:
            raise ValueError(f"grad_bias has {grad_bias.shape[0]} entries for {grad_weight.shape[0]} output channels")
    mode = dispatch(dev)
    if mode == "reference":
        return contrastive_conv_grad_ref(x_a, s_a, idx_a, x_b, s_b, idx_b, conv_out_size, stride, padding,
                                         dilation, groups, pool, float(scale), grad_weight, grad_bias)
    check_no_grad("contrastive_conv_grad", (("x_a", x_a), ("s_a", s_a), ("x_b", x_b), ("s_b", s_b),
                                            ("grad_weight", grad_weight), ("grad_bias", grad_bias)))
    if mode == "triton":
        return triton_op("contrastive_conv_grad")(x_a, s_a, idx_a, x_b, s_b, idx_b, conv_out_size, stride, padding,
                                                  dilation, groups, pool, float(scale), grad_weight, grad_bias)
    compiled_op("contrastive_conv_grad")(x_a, s_a, idx_a, x_b, s_b, idx_b, conv_out_size, stride, padding,
                                         dilation, groups, pool, float(scale), grad_weight, grad_bias)
