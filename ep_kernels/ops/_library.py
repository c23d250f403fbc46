"""The ops in PyTorch's dispatcher: fake kernels and autograd for the compiled ops, and the
Triton kernels registered as ops of their own.

- ``torch.ops.ep_kernels.<op>``: the compiled CPU and CUDA kernels (schemas in
  ``csrc/ep_kernels.cpp``, which names this module with ``m.set_python_module``: torch imports
  it when it needs a fake kernel). ``load_compiled()`` loads the extension and registers
  the fake kernels (``_meta``) and the autograd formulas (``_autograd``) once.
- ``torch.ops.ep_kernels_triton.<op>``: the Triton kernels (``ep_kernels.triton``), defined
  with the very same schemas (``SCHEMAS``; a test holds the two namespaces equal) and the
  same fake kernels and autograd formulas, so ``opcheck``, ``torch.compile`` and autograd
  treat the Triton backend like the compiled one. Defined on first use: importing Triton
  (and choosing its interpreter) must wait until the backend is asked for.
"""
import threading

import torch

from .. import _ext
from . import _autograd
from ._meta import META, check_overlap

# The schemas of csrc/ep_kernels.cpp, for the Triton namespace.
SCHEMAS = {
    "conv_pool_drive": "conv_pool_drive(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
                       "int[2] dilation, int groups, int pool) -> (Tensor, Tensor)",
    "pool_conv_transpose": "pool_conv_transpose(Tensor s, Tensor indices, Tensor weight, int[2] input_size, "
                           "int[2] conv_out_size, int[2] stride, int[2] padding, int[2] dilation, int groups, "
                           "int pool) -> Tensor",
    "state_update": "state_update(Tensor drive, Tensor? top_down, Tensor? nudge, Tensor? prev, float gain, "
                    "Tensor(a!) out) -> Tensor",
    "contrastive_conv_grad": "contrastive_conv_grad(Tensor x_a, Tensor s_a, Tensor idx_a, Tensor x_b, Tensor s_b, "
                             "Tensor idx_b, int[2] conv_out_size, int[2] stride, int[2] padding, int[2] dilation, "
                             "int groups, int pool, float scale, Tensor(a!) grad_weight, Tensor(b!)? grad_bias) -> ()",
}
AUTOGRAD = {
    "conv_pool_drive": (_autograd.conv_pool_drive_backward, _autograd.conv_pool_drive_setup),
    "pool_conv_transpose": (_autograd.pool_conv_transpose_backward, _autograd.pool_conv_transpose_setup),
}

_lock = threading.Lock()  # two threads' first calls must not register twice
_compiled_registered = False
_triton_library = None  # the torch.library.Library of namespace ep_kernels_triton, once defined


def _register(namespace, lib=None):
    for name, meta in META.items():
        torch.library.register_fake(f"{namespace}::{name}", meta, lib=lib)
    for name, (backward, setup) in AUTOGRAD.items():
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup, lib=lib)


def load_compiled():
    """Load the compiled ops (``torch.ops.ep_kernels.*``) and register their fake kernels and
    autograd formulas; raises ``RuntimeError`` saying why when they are unavailable."""
    _ext.require_compiled("cpu")
    _register_compiled()


def _register_compiled():
    global _compiled_registered
    with _lock:
        if not _compiled_registered:
            _register("ep_kernels")
            _compiled_registered = True


def _compiled_ops_defined():
    try:
        torch.ops.ep_kernels.state_update  # noqa: B018 (raises when the library is not loaded)
        return True
    except (AttributeError, RuntimeError):
        return False


def compiled_op(name):
    load_compiled()
    return getattr(torch.ops.ep_kernels, name)


def _checked(op, kernel):
    """A Triton kernel behind its op's contract: a direct ``torch.ops.ep_kernels_triton`` call
    is checked like the C++ kernels check theirs (the kernels themselves trust their input)."""
    meta = META[op]

    def impl(*args):
        meta(*args)
        if op == "state_update":
            check_overlap(*args[:4], args[5])
        return kernel(*args)

    impl.__name__ = f"{op}_triton"
    return impl


def triton_op(name):
    """``torch.ops.ep_kernels_triton.<name>``, defined on first use."""
    global _triton_library
    with _lock:
        if _triton_library is None:
            from .. import triton as ep_triton  # defines the kernels (under the interpreter if chosen)

            lib = torch.library.Library("ep_kernels_triton", "DEF")
            for op, schema in SCHEMAS.items():
                lib.define(schema)
                # CUDA tensors; CPU tensors only under the interpreter (the kernels check which)
                for key in ("CUDA", "CPU"):
                    lib.impl(op, _checked(op, ep_triton.OPS[op]), key)
            _register("ep_kernels_triton", lib)
            _triton_library = lib
    return getattr(torch.ops.ep_kernels_triton, name)


if _compiled_ops_defined():  # imported by torch for a fake kernel (the library is loaded by then)
    _register_compiled()
