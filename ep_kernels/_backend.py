"""Which implementation of the ops runs: ``reference``, ``cpu``, ``triton`` or ``cuda``.

Order of precedence: ``use_backend(name)`` (innermost wins), then the environment variable
``EP_KERNELS_BACKEND``, then the default for the tensors' device. A backend asked for by
name is used or an error is raised; only the per-device default may fall back (with a
warning) when the compiled extension is missing.
"""
import contextlib
import os
import threading
import warnings

from . import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")
_state = threading.local()
_warned_fallback = False


def _stack():
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def _validate(name):
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown ep_kernels backend {name!r}; choose one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend ``name`` (no fallback)."""
    _validate(name)
    if name in ("triton", "cuda"):
        raise NotImplementedError(
            f"backend {name!r} is not implemented yet in this version of ep_kernels "
            "(only 'reference' and 'cpu')"
        )
    _stack().append(name)
    try:
        yield
    finally:
        _stack().pop()


def requested_backend():
    """The backend asked for by name (context manager or env var), or None."""
    st = _stack()
    if st:
        return st[-1]
    env = os.environ.get("EP_KERNELS_BACKEND", "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"EP_KERNELS_BACKEND={env!r} is not one of {BACKENDS}")
        if env in ("triton", "cuda"):
            raise NotImplementedError(f"EP_KERNELS_BACKEND={env!r}: backend not implemented yet")
        return env
    return None


def backend_for(device) -> str:
    """The backend the ops use for tensors on ``device``."""
    global _warned_fallback
    name = requested_backend()
    dev_type = getattr(device, "type", device)
    if name is not None:
        if name == "cpu":
            _ext.require_compiled("cpu")
            if dev_type != "cpu":
                raise RuntimeError(f"backend 'cpu' was asked for but the tensors are on {device}")
        return name
    if dev_type == "cpu":
        if _ext.compiled_available():
            return "cpu"
        if not _warned_fallback:
            warnings.warn(
                f"ep_kernels: compiled CPU ops unavailable ({_ext.load_error()}); "
                "using the 'reference' backend (slower). Set EP_KERNELS_BACKEND=cpu to make this an error.",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned_fallback = True
        return "reference"
    # No GPU kernels yet: plain torch ops are the best we have on other devices.
    return "reference"


def available_backends():
    out = ["reference"]
    if _ext.compiled_available():
        out.append("cpu")
    return out
