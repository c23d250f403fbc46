"""Top-down signal through a conv synapse (with optional max-pool): ``W^T * U(s)``.

``U`` max-unpools ``s`` (N, C_out, Hp, Wp) to the argmax positions ``indices`` in the
(N, C_out, H_conv, W_conv) conv-output plane (the identity when pool == 1); then the
transposed convolution maps it back to the input's (N, C_in, H_in, W_in) grid, i.e. the
gradient of ``<s, P(W * x + b)>`` with respect to ``x`` with the argmax positions held fixed.
Only 1/k^2 of the unpooled map is non-zero, which is what the compiled kernel exploits.
"""
import torch
import torch.nn.functional as F

from ._common import check_float, check_tensor, compiled_op, dispatch, pair


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


def pool_conv_transpose(s, indices, weight, input_size, conv_out_size, stride=1, padding=0, dilation=1, groups=1, pool=1):
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    input_size, conv_out_size = pair(input_size, "input_size"), pair(conv_out_size, "conv_out_size")
    check_tensor(s, "s", ndim=4)
    check_float(s, "s")
    check_tensor(weight, "weight", ndim=4, dtype=s.dtype, device=s.device)
    if s.shape[1] != weight.shape[0]:
        raise ValueError(f"s has {s.shape[1]} channels but weight has {weight.shape[0]} output channels")
    if pool > 1:
        check_tensor(indices, "indices", ndim=4, dtype=torch.int64, device=s.device)
        if indices.shape != s.shape:
            raise ValueError(f"indices shape {tuple(indices.shape)} != s shape {tuple(s.shape)}")
        exp = [conv_out_size[0] // pool, conv_out_size[1] // pool]
        if list(s.shape[2:]) != exp:
            raise ValueError(f"s spatial size {tuple(s.shape[2:])} != conv_out_size // pool = {tuple(exp)}")
    elif list(s.shape[2:]) != list(conv_out_size):
        raise ValueError(f"s spatial size {tuple(s.shape[2:])} != conv_out_size {tuple(conv_out_size)}")
    if dispatch(s.device) == "reference":
        return pool_conv_transpose_ref(s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool)
    return compiled_op("pool_conv_transpose")(
        s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool
    )
