"""Top-down signal through a conv synapse (with optional max-pool): ``W^T * U(s)``.

``U`` max-unpools ``s`` (N, C_out, Hp, Wp) to the argmax positions ``indices`` in the
(N, C_out, H_conv, W_conv) conv-output plane (the identity when pool == 1); then the
transposed convolution maps it back to the input's (N, C_in, H_in, W_in) grid, i.e. the
gradient of ``<s, P(W * x + b)>`` with respect to ``x`` with the argmax positions held fixed.
Only 1/k^2 of the unpooled map is non-zero, which is what the compiled kernel exploits.

The compiled kernel reads the weight in a packed layout. It packs it on every call unless
given ``packed_weight=pack_top_down_weight(weight)``: pack once per weight update (e.g. once
per ``ep_backward``) and pass it to every call with that weight. ``packed_weight`` must be the
packing of this very weight (repack after any change of it); the reference ignores it.

Compiled kernel (pool > 1, float32/float64; other cases take ATen's dense path):
``indices`` must be those of a k x k max-pool of stride k (each inside its own window, as
``conv_pool_drive`` produces them); others raise RuntimeError (``max_unpool2d`` would accept
any position in the plane). Exact zeros of ``s`` are skipped, so with non-finite weights the
result may differ from the dense reference (0 * inf); NaN in ``s`` propagates. The result
does not depend on the number of threads.
"""
import torch
import torch.nn.functional as F

from ._common import check_conv_params, check_float, check_no_grad, check_tensor, compiled_op, \
    conv_out_size as _conv_out, dispatch, pair, triton_op


def pool_conv_transpose_ref(s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool):
    if pool > 1:
        u = F.max_unpool2d(s, indices, pool, pool, output_size=list(conv_out_size))
    else:
        u = s
    n = s.shape[0]
    c_in = weight.shape[1] * groups
    return torch.nn.grad.conv2d_input(
        (n, c_in, input_size[0], input_size[1]), weight, u, stride, padding, dilation, groups
    )


def pack_top_down_weight(weight):
    """The packed layout of ``weight`` for the compiled ``pool_conv_transpose``, or None when
    the compiled kernel is not the one that will run for it (reference backend, another
    device, a dtype other than float32/float64): passing None is always valid."""
    check_tensor(weight, "weight", ndim=4)
    check_float(weight, "weight")
    if (weight.dtype not in (torch.float32, torch.float64) or weight.device.type != "cpu"
            or dispatch(weight.device) != "compiled"):
        return None
    with torch.no_grad():
        return compiled_op("pack_top_down_weight")(weight)


def pool_conv_transpose(s, indices, weight, input_size, conv_out_size, stride=1, padding=0, dilation=1, groups=1, pool=1,
                        packed_weight=None):
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    input_size, conv_out_size = pair(input_size, "input_size"), pair(conv_out_size, "conv_out_size")
    check_conv_params(stride, padding, dilation, groups, pool)
    check_tensor(s, "s", ndim=4)
    check_float(s, "s")
    check_tensor(weight, "weight", ndim=4, dtype=s.dtype, device=s.device)
    if s.shape[1] != weight.shape[0]:
        raise ValueError(f"s has {s.shape[1]} channels but weight has {weight.shape[0]} output channels")
    if weight.shape[0] % groups != 0:
        raise ValueError(f"weight has {weight.shape[0]} output channels, not divisible by groups={groups}")
    if min(input_size) < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    expected = _conv_out(input_size, weight.shape[2:], stride, padding, dilation)
    if list(conv_out_size) != expected:
        raise ValueError(f"conv_out_size {list(conv_out_size)} does not match the convolution of an input of "
                         f"size {list(input_size)} (which gives {expected})")
    if pool > 1:
        check_tensor(indices, "indices", ndim=4, dtype=torch.int64, device=s.device)
        if indices.shape != s.shape:
            raise ValueError(f"indices shape {tuple(indices.shape)} != s shape {tuple(s.shape)}")
        exp = [conv_out_size[0] // pool, conv_out_size[1] // pool]
        if list(s.shape[2:]) != exp:
            raise ValueError(f"s spatial size {tuple(s.shape[2:])} != conv_out_size // pool = {tuple(exp)}")
    elif list(s.shape[2:]) != list(conv_out_size):
        raise ValueError(f"s spatial size {tuple(s.shape[2:])} != conv_out_size {tuple(conv_out_size)}")
    if packed_weight is not None:
        check_tensor(packed_weight, "packed_weight", ndim=1, dtype=s.dtype, device=s.device)
    mode = dispatch(s.device)
    if mode == "reference":
        return pool_conv_transpose_ref(s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool)
    if mode == "triton":  # no autograd formula on this path
        check_no_grad("pool_conv_transpose", (("s", s), ("weight", weight)))
        return triton_op("pool_conv_transpose")(s, indices, weight, input_size, conv_out_size, stride, padding,
                                                dilation, groups, pool)
    return compiled_op("pool_conv_transpose")(
        s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool, packed_weight
    )
