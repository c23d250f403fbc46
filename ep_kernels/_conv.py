"""The convolution the Python ops share (see ``conv2d``)."""
import torch
import torch.nn.functional as F


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    """``F.conv2d``, but bfloat16 / float16 on the CPU are computed in float32 and rounded once.

    Why: torch 2.13's oneDNN bfloat16 forward convolution segfaults on CPUs with AMX for some
    geometries (measured on a Xeon with amx_bf16: a (1, 12, 1, 6) input, a 3x2 kernel, stride 2,
    dilation 2, groups 1 or 3; padding 0 to 3), and a crash cannot be caught. oneDNN accumulates
    bfloat16 in float32 anyway, so the result differs only in summation order. The C++ CPU kernel
    does the same (csrc/cpu/conv_pool_drive.cpp).

    A leaf module (only torch): the reference ops, their autograd formulas and the Triton
    fallback all import it, and the Triton package is imported by the op registry."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        y = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding, dilation,
                     groups)
        return y.to(x.dtype)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
