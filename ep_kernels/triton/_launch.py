"""What the Triton kernels share: dtype mapping, block configurations, and the launch
function, which can record launches instead of running them (``record_launches``) so that
every kernel variant can be compiled for a GPU target on a machine without one
(``ep_kernels.triton.compile_check``).

Kernels are defined when this package is imported. Under ``TRITON_INTERPRET=1`` (set before
the import) they are interpreted and run on CPU tensors; that is how CI tests them.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_RECORD = None  # a list while record_launches() is active


def _fix_interpreter_index():
    """Triton 3.6's interpreter turns a scalar kernel argument used as a loop bound
    (``range(KH)``) into a Python int with ``int(array_of_shape_(1,))``, which NumPy >= 2.4
    refuses. Make that conversion take the single element instead (only under the
    interpreter; the patch lives in the interpreter's own patch scope, undone after each run)."""
    from triton.runtime import interpreter

    orig = interpreter._patch_lang_tensor
    if getattr(orig, "_ep_kernels_index_fix", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._ep_kernels_index_fix = True
    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _fix_interpreter_index()

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}


@triton.jit
def to_storage(x, DTYPE: tl.constexpr, IS_BF16: tl.constexpr):
    """``x`` (float32 or float64) converted to the storage type ``DTYPE``, rounding to nearest
    even. bfloat16 is rounded by hand: Triton's interpreter truncates (or, asked for
    round-to-nearest, drops the carry into the exponent), so its results would differ from
    torch's; the integer form is exact on a GPU too."""
    if IS_BF16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, r * 0 + 0x7FC0, r)  # NaN: torch's quiet NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


def compute_dtype(dtype):
    """Arithmetic type for a storage type: float64 stays float64; float32 and the 16-bit
    types compute in float32 (16-bit values are converted after loading)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_compute(dtype):
    return _TL_DTYPE[compute_dtype(dtype)]


def tl_storage(dtype):
    return _TL_DTYPE[dtype]


def dot_precision(dtype):
    """``input_precision`` of ``tl.dot`` for float32 operands: TF32 when torch lets its own
    convolutions use it (``torch.backends.cudnn.allow_tf32``, on by default), else IEEE.
    The same setting governs the reference's cuDNN convolutions, so both sides of a
    comparison or a benchmark compute alike. Other dtypes: 'ieee' (ignored by Triton)."""
    if dtype == torch.float32 and not INTERPRETED and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def dot_in_f32(dtype):
    """Whether 16-bit operands are converted to float32 before ``tl.dot``: always under the
    interpreter (it computes bf16 products wrongly otherwise); on a GPU they stay 16-bit
    (tensor cores, float32 accumulation)."""
    return INTERPRETED or dtype in (torch.float32, torch.float64)


def scalar(value, dtype, device):
    """A 1-element tensor holding ``value`` in the compute type: Triton passes Python floats
    as float32, which would round a float64 computation's scale. ``torch.full`` is a device
    fill (no host copy), so it is safe inside a CUDA graph capture."""
    return torch.full((1,), value, dtype=compute_dtype(dtype), device=device)


def cdiv(a, b):
    return (a + b - 1) // b


def launch(kernel, grid, args, consts):
    """``kernel[grid](*args, **consts)``, or record it under ``record_launches``."""
    if _RECORD is not None:
        _RECORD.append((kernel, tuple(grid), tuple(args), dict(consts)))
        return
    kernel[tuple(grid)](*args, **consts)


@contextlib.contextmanager
def record_launches():
    """Record the launches of the wrappers inside the block instead of running them (their
    results are then garbage). Used to compile every kernel variant for a GPU target."""
    global _RECORD
    prev, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = prev


def check_device(t):
    if t.device.type == "cuda" or _RECORD is not None:
        return
    if t.device.type == "cpu" and INTERPRETED:
        return
    if t.device.type == "cpu":
        raise RuntimeError(
            "ep_kernels' Triton kernels run on CUDA tensors; on CPU tensors only under the Triton interpreter, "
            "and TRITON_INTERPRET=1 was not set when ep_kernels.triton was imported")
    raise RuntimeError(f"ep_kernels' Triton kernels cannot run on {t.device} tensors")
