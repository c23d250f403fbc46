"""Loads the compiled extension ``ep_kernels._C`` and checks it matches the running torch.

A torch extension built against one torch and imported under another either fails to load
or, worse, loads and misbehaves. We record the build-time torch version (setup.py writes
``_build_info.py``) and refuse the compiled backends on a mismatch, with a message that says
how to rebuild.
"""
import torch

_LOAD_ERROR = None
_LOADED = False


def _load():
    global _LOAD_ERROR, _LOADED
    if _LOADED or _LOAD_ERROR is not None:
        return
    try:
        from . import _build_info
    except ImportError:
        _LOAD_ERROR = (
            "ep_kernels was not built (no _build_info.py): install it with "
            "`pip install --no-build-isolation .` from the source folder"
        )
        return
    if _build_info.TORCH_VERSION != torch.__version__:
        _LOAD_ERROR = (
            f"ep_kernels' compiled ops were built against torch {_build_info.TORCH_VERSION} "
            f"but torch {torch.__version__} is running; rebuild with "
            "`pip install --no-build-isolation --force-reinstall --no-deps .`"
        )
        return
    try:
        from . import _C  # noqa: F401  (registers torch.ops.ep_kernels.*)
    except ImportError as e:
        _LOAD_ERROR = f"ep_kernels' compiled extension failed to load: {e}"
        return
    _LOADED = True


def compiled_available() -> bool:
    _load()
    return _LOADED


def load_error():
    _load()
    return _LOAD_ERROR


def require_compiled(backend: str):
    _load()
    if not _LOADED:
        raise RuntimeError(f"backend {backend!r} was asked for but is unavailable: {_LOAD_ERROR}")
