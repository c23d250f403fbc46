"""What the op wrappers share: argument normalisation, the grad refusal of in-place ops, and
running the backend chosen by ``ep_kernels._backend``."""
import torch

from .._backend import backend_for
from . import _library


def pair(op, v, name):
    """An int or a pair of ints as a list of two (the wrappers' convenience; the range check
    is the meta function's)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return [v, v]
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return list(v)
    raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")


def check_no_grad(op, tensors):
    """Ops without an autograd formula refuse tensors that would need one."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(
                f"{op}: {name} requires grad, but this op has no autograd formula (it writes its result "
                f"in place); detach it or run under torch.no_grad(), or use {op}_ref for autograd"
            )


def run(op, device, reference, args):
    """``op(*args)`` on the backend chosen for ``device``: the plain-torch ``reference``, the
    Triton op, or the compiled op (CPU and CUDA kernels share one dispatcher name)."""
    backend = backend_for(device)
    if backend == "reference":
        return reference(*args)
    if backend == "triton":
        return _library.triton_op(op)(*args)
    return _library.compiled_op(op)(*args)
