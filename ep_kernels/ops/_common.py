"""What the op wrappers share: argument normalisation, the grad refusal of in-place ops, and
running the backend chosen by ``ep_kernels._backend``."""
import torch
import torch.nn.functional as F

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


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    """``F.conv2d``, but bfloat16 / float16 on the CPU are computed in float32 and rounded once.

    Why: torch 2.13's oneDNN bfloat16 forward convolution segfaults on CPUs with AMX for some
    geometries (measured on a Xeon with amx_bf16: a (1, 12, 1, 6) input, a 3x2 kernel, stride 2,
    dilation 2, groups 1 or 3; padding 0 to 3), and a crash cannot be caught. oneDNN accumulates
    bfloat16 in float32 anyway, so the result differs only in summation order. The C++ CPU kernel
    does the same (csrc/cpu/conv_pool_drive.cpp)."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        y = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding, dilation,
                     groups)
        return y.to(x.dtype)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


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
