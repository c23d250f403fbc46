"""Helpers shared by the op wrappers: argument checks and backend dispatch."""
import torch

from .._backend import backend_for

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def pair(v, name):
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return [v, v]
    try:
        v = list(v)
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if len(v) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return v


def check_tensor(t, name, ndim=None, dtype=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other operands are on {device}")


def check_float(t, name):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_conv_params(stride, padding, dilation, groups, pool):
    """Ranges of the convolution hyper-parameters (already made pairs)."""
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise ValueError(f"pool must be a positive int (1 = no pooling), got {pool!r}")


def conv_out_size(hw, kernel, stride, padding, dilation):
    return [(hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]


def overlaps(a, b):
    """Whether two tensors may share memory (conservative: same storage, intersecting byte ranges)."""
    if a.device != b.device or a.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return a is b
    try:
        sa, sb = a.untyped_storage(), b.untyped_storage()
    except (RuntimeError, NotImplementedError):  # e.g. meta tensors without storage
        return a.data_ptr() == b.data_ptr()
    if sa.data_ptr() != sb.data_ptr():
        return False

    def span(t):
        lo = t.storage_offset()
        hi = lo + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
        return lo * t.element_size(), hi * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


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


def compiled_op(name):
    return getattr(torch.ops.ep_kernels, name)


def triton_op(name):
    """The Triton implementation of op ``name`` (imports ``ep_kernels.triton`` on first use,
    so its kernels are defined only when the triton backend runs)."""
    from .. import triton as ep_triton

    return ep_triton.OPS[name]


def dispatch(device):
    """'reference', 'triton', or 'compiled': the compiled ops (backends 'cpu' and 'cuda') are
    registered per device with the dispatcher, so one torch.ops name serves both."""
    b = backend_for(device)
    if b in ("reference", "triton"):
        return b
    return "compiled"
