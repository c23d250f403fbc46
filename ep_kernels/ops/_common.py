"""Helpers shared by the op wrappers: argument checks and backend dispatch."""
import torch

from .._backend import backend_for

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def pair(v, name):
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
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


def compiled_op(name):
    return getattr(torch.ops.ep_kernels, name)


def dispatch(device):
    """'reference' or 'compiled': the compiled ops are registered per device with the
    dispatcher, so one torch.ops name serves every compiled backend."""
    b = backend_for(device)
    return "reference" if b == "reference" else "compiled"
