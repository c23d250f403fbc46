"""Top-down signal through a conv synapse (with optional max-pool): ``W^T * U(s)``.

``U`` max-unpools ``s`` (N, C_out, Hp, Wp) to the argmax positions ``indices`` in the
(N, C_out, H_conv, W_conv) conv-output plane (the identity when pool == 1); then the
transposed convolution maps it back to the input's (N, C_in, H_in, W_in) grid, i.e. the
gradient of ``<s, P(W * x + b)>`` with respect to ``x`` with the argmax positions held fixed.
Only 1/k^2 of the unpooled map is non-zero, which is what the compiled CPU kernel exploits
(it reads the weight in a packed layout, which it makes and keeps itself, reused only while
the weight's bytes are unchanged).

Compiled CPU kernel (pool > 1, float32/float64; other cases take ATen's dense path):
``indices`` must be those of a k x k max-pool of stride k (each inside its own window, as
``conv_pool_drive`` produces them); others raise ValueError (``max_unpool2d``, the
reference, accepts any position in the plane). Exact zeros of ``s`` are skipped, so with
non-finite weights the result may differ from the dense reference (0 * inf); NaN in ``s``
propagates. The result does not depend on the number of threads.
"""
import torch.nn.functional as F
from torch.nn.grad import conv2d_input

from ._common import pair, run
from ._meta import pool_conv_transpose_meta


def pool_conv_transpose_ref(s, indices, weight, input_size, conv_out_size, stride, padding, dilation, groups, pool):
    u = F.max_unpool2d(s, indices, pool, pool, output_size=list(conv_out_size)) if pool > 1 else s
    shape = (s.shape[0], weight.shape[1] * groups, input_size[0], input_size[1])
    return conv2d_input(shape, weight, u, stride, padding, dilation, groups)


def pool_conv_transpose(s, indices, weight, input_size, conv_out_size, stride=1, padding=0, dilation=1, groups=1,
                        pool=1):
    """The top-down signal ``W^T * U(s)`` of a conv synapse.

    Args:
        s: (N, C_out, Hc // pool, Wc // pool) state of the layer above, floating point.
        indices: the pooling argmax of the drive (int64, the shape of ``s``); ignored (may be
            empty) when ``pool == 1``.
        weight: (C_out, C_in / groups, kH, kW), same dtype and device as ``s``.
        input_size: (H_in, W_in), the spatial size of the layer below.
        conv_out_size: (Hc, Wc), the convolution's output size for ``input_size`` (checked).
        stride, padding, dilation, groups, pool: as for ``conv_pool_drive``.

    Returns:
        (N, C_in, H_in, W_in).
    """
    op = "pool_conv_transpose"
    args = (s, indices, weight, pair(op, input_size, "input_size"), pair(op, conv_out_size, "conv_out_size"),
            pair(op, stride, "stride"), pair(op, padding, "padding"), pair(op, dilation, "dilation"), groups, pool)
    pool_conv_transpose_meta(*args)
    return run(op, s.device, pool_conv_transpose_ref, args)
