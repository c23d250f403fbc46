"""Which implementation of the ops runs: ``reference``, ``cpu``, ``triton`` or ``cuda``.

Order of precedence: ``use_backend(name)`` (innermost wins), then the environment variable
``EP_KERNELS_BACKEND``, then the default for the tensors' device. A backend asked for by
name is used or an error is raised; only the per-device default may fall back (with a
warning) when the compiled extension is missing.

- ``cpu``: the compiled C++ kernels, CPU tensors only.
- ``triton``: ``ep_kernels.triton``, CUDA tensors; CPU tensors only under the Triton
  interpreter (``TRITON_INTERPRET=1`` set before the kernels are defined: how CI tests them).
- ``cuda``: the compiled CUDA kernels (``torch.ops.ep_kernels.*`` on CUDA tensors), present
  when the extension was built with a CUDA toolkit against a CUDA build of torch.

Defaults: ``cpu`` on CPU tensors; ``reference`` on every other device (the GPU backends are
used when asked for by name until a GPU run of ``bench/gpu_check.sh`` has validated them).
"""
import contextlib
import importlib.util
import os
import sys
import warnings

from . import _ext
from ._context import ThreadLocalStack

BACKENDS = ("reference", "cpu", "triton", "cuda")
_requested = ThreadLocalStack()  # backend names of the enclosing use_backend blocks, this thread
_warned_fallback = False


def _validate(name):
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown ep_kernels backend {name!r}; choose one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend ``name`` (no fallback)."""
    with _requested.pushed(_validate(name)):
        yield


def requested_backend():
    """The backend asked for by name (context manager or env var), or None."""
    name = _requested.top()
    if name is not None:
        return name
    env = os.environ.get("EP_KERNELS_BACKEND", "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"EP_KERNELS_BACKEND={env!r} is not one of {BACKENDS}")
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
        elif name == "triton":
            _require_triton(dev_type, device)
        elif name == "cuda":
            _require_cuda(dev_type, device)
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
    # Other devices: plain torch ops unless a GPU backend is asked for by name (see the module docstring).
    return "reference"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` now, and, if
    ``ep_kernels.triton`` is already imported, its kernels were defined under it too."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    mod = sys.modules.get("ep_kernels.triton._launch")
    return mod is None or mod.INTERPRETED


def cuda_kernels_available() -> bool:
    """Whether the compiled extension registered CUDA kernels with the dispatcher."""
    if not _ext.compiled_available():
        return False
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("ep_kernels::state_update", "CUDA")


def _require_triton(dev_type, device):
    if not triton_installed():
        raise RuntimeError("backend 'triton' was asked for but the triton package is not installed "
                           "(pip install triton)")
    if dev_type == "cuda":
        return
    if dev_type == "cpu":
        if not triton_interpreting():
            raise RuntimeError(
                "backend 'triton' runs on CUDA tensors; these are CPU tensors, which the Triton kernels take only "
                "under the Triton interpreter: set TRITON_INTERPRET=1 before ep_kernels.triton is first imported "
                "(or use backend 'cpu' or 'reference')")
        return
    raise RuntimeError(f"backend 'triton' was asked for but the tensors are on {device}")


def _require_cuda(dev_type, device):
    if dev_type != "cuda":
        raise RuntimeError(f"backend 'cuda' was asked for but the tensors are on {device}")
    _ext.require_compiled("cuda")
    if not cuda_kernels_available():
        raise RuntimeError(
            "backend 'cuda' was asked for but ep_kernels was built without its CUDA kernels (the build needs a "
            "CUDA build of torch and a CUDA toolkit with nvcc; setup.py printed why it skipped them). "
            "Rebuild with `pip install --no-build-isolation --force-reinstall --no-deps .` on such a machine, "
            "or use backend 'triton' or 'reference'")


def available_backends():
    """Backends that can run here (on some device): reference, cpu (compiled), triton
    (installed, and a GPU or the interpreter), cuda (CUDA kernels compiled and a GPU)."""
    import torch

    out = ["reference"]
    if _ext.compiled_available():
        out.append("cpu")
    if triton_installed() and (torch.cuda.is_available() or triton_interpreting()):
        out.append("triton")
    if cuda_kernels_available() and torch.cuda.is_available():
        out.append("cuda")
    return out
