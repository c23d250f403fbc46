"""The EP ops. Each op: a ``*_ref`` of plain torch ops (the specification) and a wrapper
that checks its arguments and runs the backend chosen by ``ep_kernels._backend``.
The compiled kernels live in ``csrc/`` and are registered as ``torch.ops.ep_kernels.*``.
"""
from . import _fake  # noqa: F401  (fake kernels + autograd of the compiled ops, once the library loads)
from .conv_pool_drive import conv_pool_drive, conv_pool_drive_ref
from .contrastive_conv_grad import contrastive_conv_grad, contrastive_conv_grad_ref
from .pool_conv_transpose import pack_top_down_weight, pool_conv_transpose, pool_conv_transpose_ref
from .state_update import state_update, state_update_ref

__all__ = [
    "conv_pool_drive", "conv_pool_drive_ref",
    "pool_conv_transpose", "pool_conv_transpose_ref", "pack_top_down_weight",
    "state_update", "state_update_ref",
    "contrastive_conv_grad", "contrastive_conv_grad_ref",
]
