"""Loads ep_kernels' compiled ops (``torch.ops.ep_kernels.*``), in one of two ways.

- Built ahead of time (``pip install --no-build-isolation .``: setup.py could import torch, so
  it compiled ``ep_kernels._C`` and wrote ``_build_info.py``). A torch extension built against
  one torch and imported under another either fails to load or, worse, loads and misbehaves,
  so a build for another torch is refused, with a message that says how to rebuild.
- Compiled on first use (a plain ``pip install .``, whose isolated build cannot see torch: the
  wheel holds the C++/CUDA sources, no ``_build_info.py``). ``_build.build_and_load`` compiles
  them into a cache keyed by torch, CUDA, Python and the sources, so a torch upgrade rebuilds.

Either way nothing happens at ``import ep_kernels``: the first use of a compiled backend loads
(or builds) the ops; ``ops._library.load_compiled`` then registers their fake kernels. A
failure is kept in ``load_error()``; ``_backend`` then falls back to the 'reference' backend by
default, or raises with it when a compiled backend is asked for by name.
"""
import threading

import torch

_LOAD_ERROR = None
_LOADED = False
_lock = threading.Lock()  # two threads' first uses: one build, one load

_REBUILD = ("rebuild with `pip install --no-build-isolation --force-reinstall --no-deps .` from the source "
            "folder, or reinstall without --no-build-isolation (`pip install --force-reinstall --no-deps .`) "
            "to compile them on first use for whichever torch runs")


def _load():
    global _LOAD_ERROR, _LOADED
    if _LOADED or _LOAD_ERROR is not None:
        return
    with _lock:
        if _LOADED or _LOAD_ERROR is not None:
            return
        info = _build_info()
        _LOAD_ERROR = _load_prebuilt(info) if info is not None else _load_first_use()
        _LOADED = _LOAD_ERROR is None


def _build_info():
    """setup.py's record of an ahead-of-time build, or None (the ops compile on first use)."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info


def _load_prebuilt(info):
    """Import the ahead-of-time ``_C``; an error message, or None."""
    if info.TORCH_VERSION != torch.__version__:
        return (f"ep_kernels' compiled ops were built against torch {info.TORCH_VERSION} "
                f"but torch {torch.__version__} is running; {_REBUILD}")
    try:
        from . import _C  # noqa: F401  (registers torch.ops.ep_kernels.*)
    except ImportError as e:
        return f"ep_kernels' compiled extension failed to load: {e}"
    return None


def _load_first_use():
    """Build (once per torch version, into the cache) and load the ops; an error message, or None."""
    from . import _build

    try:
        _build.build_and_load(_build.ops_spec())
    except Exception as e:  # no compiler, no ninja, a compile error, an unwritable cache...
        return (f"ep_kernels could not compile its C++ ops on first use ({type(e).__name__}: {e}); "
                "they need a C++ compiler (gcc) and ninja (`pip install ninja`); "
                f"EP_KERNELS_CACHE sets the cache folder (now {_build.cache_root()})")
    return None


def loaded() -> bool:
    """Whether the compiled ops are loaded already (loads nothing)."""
    return _LOADED


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
