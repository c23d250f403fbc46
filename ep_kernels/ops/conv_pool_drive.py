"""conv + bias + k x k max-pool with argmax: the drive ``P(W * s + b)`` of a conv synapse.

Returns ``(drive, indices)``. ``indices`` are max_pool2d's: the flat position of each
window's winner in the (H_conv x W_conv) plane of its (n, c); ties go to the first position
of the window in row-major order. With ``pool == 1`` there is no pooling and ``indices`` is
an empty int64 tensor.
"""
import torch
import torch.nn.functional as F

from .._conv import conv2d
from ._common import pair, run
from ._meta import conv_pool_drive_meta


def conv_pool_drive_ref(x, weight, bias, stride, padding, dilation, groups, pool):
    y = conv2d(x, weight, bias, stride, padding, dilation, groups)
    if pool == 1:
        return y, torch.empty(0, dtype=torch.int64, device=x.device)
    return F.max_pool2d(y, pool, pool, return_indices=True)


def conv_pool_drive(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, pool=1):
    """The drive of a conv synapse and its pooling argmax.

    Args:
        x: (N, C_in, H, W) input state, floating point.
        weight: (C_out, C_in / groups, kH, kW), same dtype and device as ``x``.
        bias: (C_out,) or None.
        stride, padding, dilation: an int or a pair, as ``nn.Conv2d``'s.
        groups: as ``nn.Conv2d``'s.
        pool: the max-pool's size and stride (1: no pooling).

    Returns:
        ``(drive, indices)``: drive (N, C_out, Hc // pool, Wc // pool) where (Hc, Wc) is the
        convolution's output size, indices of the same shape (int64). For ``pool == 1`` the
        drive is (N, C_out, Hc, Wc) and indices is empty.
    """
    op = "conv_pool_drive"
    args = (x, weight, bias, pair(op, stride, "stride"), pair(op, padding, "padding"),
            pair(op, dilation, "dilation"), groups, pool)
    conv_pool_drive_meta(*args)
    return run(op, x.device, conv_pool_drive_ref, args)
