"""conv + bias + k x k max-pool with argmax: the drive ``P(W * s + b)`` of a conv synapse.

Returns ``(drive, indices)``. ``indices`` are max_pool2d's: the flat position of each
window's winner in the (H_conv x W_conv) plane of its (n, c); ties go to the first position
of the window in row-major order. With ``pool == 1`` there is no pooling and ``indices`` is
an empty int64 tensor.
"""
import torch
import torch.nn.functional as F

from ._common import check_conv_params, check_float, check_no_grad, check_tensor, compiled_op, conv_out_size, \
    dispatch, pair, triton_op


def conv_pool_drive_ref(x, weight, bias, stride, padding, dilation, groups, pool):
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if pool == 1:
        return y, torch.empty(0, dtype=torch.int64, device=x.device)
    return F.max_pool2d(y, pool, pool, return_indices=True)


def _check(x, weight, bias, stride, padding, dilation, groups, pool):
    check_conv_params(stride, padding, dilation, groups, pool)
    check_tensor(x, "x", ndim=4)
    check_float(x, "x")
    check_tensor(weight, "weight", ndim=4, dtype=x.dtype, device=x.device)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtype=x.dtype, device=x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries for {weight.shape[0]} output channels")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"x has {x.shape[1]} channels but the weight expects {weight.shape[1] * groups} "
            f"(weight shape {tuple(weight.shape)}, groups={groups})"
        )
    if weight.shape[0] % groups != 0:
        raise ValueError(f"weight has {weight.shape[0]} output channels, not divisible by groups={groups}")
    hc, wc = conv_out_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    if hc < pool or wc < pool:
        raise ValueError(f"x of shape {tuple(x.shape)} gives a {hc}x{wc} convolution output, "
                         f"too small for pool={pool}")


def conv_pool_drive(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, pool=1):
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    _check(x, weight, bias, stride, padding, dilation, groups, pool)
    mode = dispatch(x.device)
    if mode == "reference":
        return conv_pool_drive_ref(x, weight, bias, stride, padding, dilation, groups, pool)
    if mode == "triton":  # no autograd formula on this path
        check_no_grad("conv_pool_drive", (("x", x), ("weight", weight), ("bias", bias)))
        return triton_op("conv_pool_drive")(x, weight, bias, stride, padding, dilation, groups, pool)
    return compiled_op("conv_pool_drive")(x, weight, bias, stride, padding, dilation, groups, pool)
