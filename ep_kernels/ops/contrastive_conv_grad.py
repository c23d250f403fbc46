"""The contrastive weight update of a conv synapse, both states in one call.

``grad_weight += scale * (dPhi/dW(x_a, s_a) - dPhi/dW(x_b, s_b))`` and likewise for the
bias, where ``dPhi/dW(x, s)`` is the convolution weight-gradient with input ``x`` and
output-gradient ``U(s)`` (``s`` max-unpooled to its argmax positions), summed over the
batch, and ``dPhi/db`` is the per-channel sum of ``s``. With ``scale = -1/(2 beta N)`` and
(a, b) = (s+, s-) this is the symmetric EP estimate, accumulated in place like autograd.
"""
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

from ._common import check_no_grad, pair, run
from ._meta import contrastive_conv_grad_meta


def _phi_grad_weight(x, s, idx, weight_shape, conv_out_size, stride, padding, dilation, groups, pool):
    u = F.max_unpool2d(s, idx, pool, pool, output_size=list(conv_out_size)) if pool > 1 else s
    return conv2d_weight(x, weight_shape, u, stride, padding, dilation, groups)


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
    """``grad_weight += scale * (dPhi/dW(x_a, s_a) - dPhi/dW(x_b, s_b))``, bias likewise.

    Args:
        x_a, x_b: (N, C_in, H, W) inputs of the synapse in the two states (may be the same tensor).
        s_a, s_b: (N, C_out, Hc // pool, Wc // pool) its states.
        idx_a, idx_b: their pooling argmax (int64, shaped like the states); ignored when
            ``pool == 1``.
        conv_out_size: (Hc, Wc), the convolution's output size for ``x_a`` (checked).
        stride, padding, dilation, groups, pool: as for ``conv_pool_drive``.
        scale: a finite float.
        grad_weight: (C_out, C_in / groups, kH, kW), same dtype and device; accumulated in place.
        grad_bias: (C_out,) or None; accumulated in place.
    """
    op = "contrastive_conv_grad"
    args = (x_a, s_a, idx_a, x_b, s_b, idx_b, pair(op, conv_out_size, "conv_out_size"), pair(op, stride, "stride"),
            pair(op, padding, "padding"), pair(op, dilation, "dilation"), groups, pool, scale, grad_weight, grad_bias)
    contrastive_conv_grad_meta(*args)
    check_no_grad(op, (("x_a", x_a), ("s_a", s_a), ("x_b", x_b), ("s_b", s_b), ("grad_weight", grad_weight),
                       ("grad_bias", grad_bias)))
    args = args[:12] + (float(scale),) + args[13:]
    run(op, grad_weight.device, contrastive_conv_grad_ref, args)
