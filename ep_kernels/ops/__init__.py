"""The EP ops. Each op has a plain-torch ``*_ref`` (its specification), a meta function
(``_meta``: the checks, and the fake kernel), and a wrapper that checks its arguments and runs
the backend chosen by ``ep_kernels.use_backend``: ``reference`` (the ``*_ref``), ``cpu`` and
``cuda`` (the compiled kernels of ``csrc/``, ``torch.ops.ep_kernels.*``) or ``triton``
(``ep_kernels.triton``, ``torch.ops.ep_kernels_triton.*``).
"""
from ._library import load_compiled
from ._meta import conv_out_size
from .contrastive_conv_grad import contrastive_conv_grad, contrastive_conv_grad_ref
from .conv_pool_drive import conv_pool_drive, conv_pool_drive_ref
from .pool_conv_transpose import pool_conv_transpose, pool_conv_transpose_ref
from .state_update import state_update, state_update_ref

__all__ = [
    "conv_pool_drive", "conv_pool_drive_ref",
    "pool_conv_transpose", "pool_conv_transpose_ref",
    "state_update", "state_update_ref",
    "contrastive_conv_grad", "contrastive_conv_grad_ref",
    "load_compiled", "conv_out_size",
]
