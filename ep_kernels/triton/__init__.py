"""Triton kernels of the EP ops (the ``triton`` backend; docs/design.md, "The ops").

One op per module, each with the signature of its ``ep_kernels.ops`` wrapper (which checks
the arguments and calls these when the backend is ``triton``):

- ``state_update``: fused add + clamp + max |change|;
- ``conv_pool_drive``: torch convolution, then a Triton bias + max-pool + argmax epilogue;
- ``pool_conv_transpose``: implicit GEMM of ``W^T`` with the state unpooled on the fly;
- ``contrastive_conv_grad``: both states' weight-gradients in one kernel, added in place.

Kernels are defined at import. On CUDA tensors they compile for the GPU; on CPU tensors they
run only under the Triton interpreter, which ``TRITON_INTERPRET=1`` must have selected
*before* this package is imported (``INTERPRETED`` records whether it did).
"""
from ._launch import INTERPRETED, record_launches
from .contrastive_conv_grad import contrastive_conv_grad
from .conv_pool_drive import conv_pool_drive, pool_argmax
from .pool_conv_transpose import pool_conv_transpose
from .state_update import state_update

OPS = {
    "state_update": state_update,
    "conv_pool_drive": conv_pool_drive,
    "pool_conv_transpose": pool_conv_transpose,
    "contrastive_conv_grad": contrastive_conv_grad,
}

__all__ = ["INTERPRETED", "OPS", "record_launches", "state_update", "conv_pool_drive", "pool_argmax",
           "pool_conv_transpose", "contrastive_conv_grad"]
