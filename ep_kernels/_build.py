"""How ep_kernels' C++/CUDA ops are built: the one description, and the build on first use.

Three users share it:

- ``setup.py`` (ahead of time, when torch is importable at build time: ``pip install
  --no-build-isolation .``); it loads this file by path, since the package cannot be imported
  before it is built;
- ``ep_kernels._ext`` (on first use, after a plain ``pip install .``, whose isolated build
  cannot see torch): :func:`build_and_load` compiles with ``torch.utils.cpp_extension.load``
  into a per-user cache keyed by everything the binary depends on;
- ``.ci/compile_cuda.sh``, which compiles the CUDA sources through :func:`build_and_load`.

The module imports only the standard library; torch is imported inside the functions that
need it, so setup.py can load it where torch is not importable (pip's isolated build).
"""
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from typing import Optional, Tuple

NAME = "_C"
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")

# Compiler CPU time of a first-use build, measured (user + sys of the build, gcc 12 / nvcc 13 for
# sm 9.0): the CPU kernels 150 s (88 s wall with 2 cores), the CUDA kernels 339 s (.ci/compile_cuda.sh).
_COMPILE_CPU_SECONDS = {"cpu": 150, "cuda": 339}


class BuildError(RuntimeError):
    """The first-use build failed; the message ends with the compiler's last lines."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """One extension: what to compile and how. Paths are absolute, except in setup.py's spec
    (``csrc="csrc"``: setuptools wants sources relative to setup.py)."""

    name: str
    csrc: str                     # root of the sources; every file under it is hashed
    sources: Tuple[str, ...]
    include_dirs: Tuple[str, ...]
    cuda_include_dirs: Tuple[str, ...]  # the nvidia-* wheels' headers: see nvidia_wheel_includes
    cflags: Tuple[str, ...]
    cuda_cflags: Tuple[str, ...]
    ldflags: Tuple[str, ...]
    with_cuda: bool
    cuda_reason: str


# libstdc++ must be the process's shared one, the copy torch uses. A compiler that links it
# statically gives the extension a second copy, whose stream and locale code meets the shared
# copy's data: seen 2026-12-04 on the GPU machines, whose $CXX (/opt/gcc/bin/g++, gcc 13.3)
# does so, the first number formatted into a message (c10::str, TORCH_CHECK) segfaulted.
# Naming the shared library before the compiler's own makes the linker take it under a plain
# -static-libstdc++ (tests/test_build.py); that machine's compiler links it statically even so,
# and check_links_shared_libstdcxx refuses the result there (the system's g++ builds it right).
LINK_SHARED_LIBSTDCXX = ("-Wl,--push-state,-Bdynamic,-lstdc++,--pop-state",)


def needed_libraries(path: str) -> Optional[list]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared library (what it links
    dynamically), or None for another format (not checked)."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, _entsize in sections:
        if sh_type != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, 16):
            tag, val = struct.unpack_from("<qQ", data, at)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab + val)
                needed.append(data[strtab + val:end].decode())
    return needed


def check_links_shared_libstdcxx(path: str) -> None:
    """Refuse a built library that does not link libstdc++ dynamically (see
    LINK_SHARED_LIBSTDCXX): it would crash at its first formatted message, not fail cleanly."""
    needed = needed_libraries(path)
    if needed is None or any(n.startswith("libstdc++.so") for n in needed):
        return
    raise BuildError(
        f"ep_kernels: the built library {path} carries its own static copy of libstdc++ (it links "
        f"{sorted(needed)} dynamically, not libstdc++.so), which crashes beside torch's shared copy. "
        f"The C++ compiler (CXX={os.environ.get('CXX', '(unset: c++)')}) links libstdc++ statically; "
        f"build with one that does not, e.g. CXX=g++ (the system's), and rebuild.")


def csrc_dir() -> str:
    """The C++/CUDA sources: ``ep_kernels/_csrc`` in an installed wheel (setup.py maps the
    repository's ``csrc/`` there), ``csrc/`` next to the package in a source tree."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc"))
    for d in candidates:
        if os.path.isfile(os.path.join(d, "ep_kernels.cpp")):
            return d
    raise FileNotFoundError(f"ep_kernels' C++ sources are missing: no ep_kernels.cpp in {' or '.join(candidates)} "
                            "(a broken install; reinstall ep_kernels)")


def cuda_decision() -> Tuple[bool, str]:
    """(compile the CUDA kernels?, why). They need a CUDA build of torch and a CUDA toolkit
    with nvcc; EP_KERNELS_NO_CUDA=1 skips them (the CPU kernels only, as on a CPU torch)."""
    import torch

    if os.environ.get("EP_KERNELS_NO_CUDA", "") == "1":
        return False, "EP_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "no CUDA toolkit found (nvcc; set CUDA_HOME)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc in {CUDA_HOME}"


def nvidia_wheel_includes() -> list:
    """Include folders of torch's own nvidia-* wheels (cuBLAS, cuSPARSE, cuDNN, ... headers that
    torch's CUDA headers include): a CUDA toolkit installed with nvcc and the runtime only lacks them."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    dirs = []
    for root in list(getattr(nvidia, "__path__", [])):
        dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
    return dirs


def cxx_standard() -> str:
    """The C++ standard torch's headers ask for: C++17 up to torch 2.13, C++20 from 2.14 on
    (ATen.h says which in its version check)."""
    from torch.utils.cpp_extension import include_paths

    for d in include_paths():
        header = os.path.join(d, "ATen", "ATen.h")
        if os.path.exists(header):
            with open(header) as f:
                return "c++20" if "202002L" in f.read(4096) else "c++17"
    return "c++17"  # a torch without headers fails at the compile, and says so


def op_sources(csrc: str, cpu: bool = True, cuda: bool = False) -> list:
    """The op schemas (``csrc/*.cpp``), plus the CPU kernels and/or the CUDA kernels."""
    found = glob.glob(os.path.join(csrc, "*.cpp"))
    if cpu:
        found += glob.glob(os.path.join(csrc, "cpu", "*.cpp"))
    if cuda:
        found += glob.glob(os.path.join(csrc, "cuda", "*.cu"))
    return sorted(found)


def ops_spec(csrc: Optional[str] = None, cpu: bool = True) -> Spec:
    """ep_kernels' extension: the CPU kernels (unless ``cpu=False``: .ci/compile_cuda.sh checks
    the CUDA sources alone) and the CUDA kernels when :func:`cuda_decision` allows them."""
    csrc = csrc_dir() if csrc is None else csrc
    with_cuda, reason = cuda_decision()
    std = cxx_standard()
    return Spec(
        name=NAME, csrc=csrc,
        sources=tuple(op_sources(csrc, cpu=cpu, cuda=with_cuda)),
        include_dirs=(os.path.abspath(csrc),),
        cuda_include_dirs=tuple(nvidia_wheel_includes()) if with_cuda else (),
        # -fopenmp: the CPU kernels parallelise with OpenMP (compile and link).
        cflags=("-O3", "-fopenmp", f"-std={std}"),
        cuda_cflags=("-O3", f"-std={std}"),
        ldflags=("-fopenmp",) + LINK_SHARED_LIBSTDCXX,
        with_cuda=with_cuda, cuda_reason=reason)


# ------------------------------------------------------------------------------------------
# The cache: one folder per key, <cache_root()>/<cache_key(spec)>
# ------------------------------------------------------------------------------------------

def cache_root() -> str:
    """``$EP_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/ep_kernels``, else ``~/.cache/ep_kernels``."""
    env = os.environ.get("EP_KERNELS_CACHE", "").strip()
    if env:
        return os.path.abspath(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ep_kernels")


def source_digest(csrc: str) -> str:
    """sha256 of every source file under ``csrc`` (headers too: a header change must rebuild)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(csrc, "**", "*"), recursive=True)):
        if path.endswith(SOURCE_SUFFIXES) and os.path.isfile(path):
            h.update(os.path.relpath(path, csrc).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()


def key_fields(spec: Spec) -> dict:
    """Everything the binary depends on, as text. Source paths are taken relative to the source
    root, so two installs of the same sources share one build."""
    import torch

    rel = lambda p: os.path.relpath(p, spec.csrc).replace(os.sep, "/")  # noqa: E731
    fields = {
        "torch": torch.__version__, "torch_git": getattr(torch.version, "git_version", ""),
        "torch_cuda": torch.version.cuda, "python_abi": sysconfig.get_config_var("EXT_SUFFIX") or sys.version,
        "name": spec.name, "sources": [rel(s) for s in spec.sources], "source_sha256": source_digest(spec.csrc),
        "cflags": list(spec.cflags), "ldflags": list(spec.ldflags), "with_cuda": spec.with_cuda,
        "cxx": os.environ.get("CXX", ""),  # the compiler cpp_extension runs
    }
    if spec.with_cuda:
        fields.update(cuda_cflags=list(spec.cuda_cflags), cuda_archs=cuda_archs(),
                      cuda_include_dirs=[os.sep.join(d.split(os.sep)[-2:]) for d in spec.cuda_include_dirs])
    return fields


def cuda_archs() -> str:
    """The GPU architectures nvcc compiles for: TORCH_CUDA_ARCH_LIST, or, unset, cpp_extension
    takes the visible GPUs' (all of torch's when none is visible). Keyed either way, so a cache
    in a home folder shared by machines with different GPUs holds one build per GPU kind."""
    import torch

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs or not torch.cuda.is_available():
        return archs or "all"
    return ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))


def cache_key(spec: Spec) -> str:
    """``<name>-torch<version>-<cp tag>-<hash of key_fields>``: readable, and new whenever
    torch, CUDA, Python, the sources or the flags change (a torch upgrade rebuilds)."""
    import torch

    fields = key_fields(spec)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return f"{spec.name}-torch{torch.__version__}-{sys.implementation.cache_tag}-{digest}"


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive flock on ``path``. Why not cpp_extension's own FileBaton: it is a file whose
    mere existence is the lock, so a build killed mid-way (SIGKILL, torchrun's SIGTERM to the
    other ranks) leaves it behind and every later process waits on it forever; a flock is
    dropped by the kernel when its holder dies."""
    import fcntl  # POSIX only, as the build itself (gcc/clang)

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ------------------------------------------------------------------------------------------
# The build on first use
# ------------------------------------------------------------------------------------------

def build_and_load(spec: Spec, root: Optional[str] = None, log=None) -> str:
    """Load ``spec``'s library into this process (registering its ops), compiling it first into
    ``<root>/<cache_key(spec)>`` if no finished build is there. Returns the library's path.

    Processes that start together (torchrun ranks, pytest-xdist workers) build once: the first
    to take the lock builds, the others wait for it and then load its result. A build is
    finished once ``done.json`` exists (written last), so a failed or killed build is redone."""
    import torch

    build_dir = os.path.join(root or cache_root(), cache_key(spec))
    done = os.path.join(build_dir, "done.json")
    if not os.path.exists(done):
        with file_lock(build_dir + ".lock"):
            if not os.path.exists(done):  # else another process built it while we waited
                _build(spec, build_dir, done, sys.stderr if log is None else log)
    with open(done) as f:
        lib = os.path.join(build_dir, json.load(f)["library"])
    torch.ops.load_library(lib)  # a no-op when _build has just loaded it
    return lib


def _build(spec: Spec, build_dir: str, done: str, log) -> None:
    """Compile with cpp_extension.load (ninja) while holding the lock; announce it in one line."""
    from torch.utils.cpp_extension import load

    os.makedirs(build_dir, exist_ok=True)
    # cpp_extension's FileBaton: left behind by a killed build. We hold the lock, so nobody
    # else is building here, and load() would otherwise wait for it forever.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(build_dir, "lock"))
    _ninja_on_path()
    print(announcement(spec, build_dir), file=log, flush=True)
    t0 = time.monotonic()
    try:
        lib = load(name=spec.name, sources=list(spec.sources), extra_cflags=list(spec.cflags),
                   extra_cuda_cflags=list(spec.cuda_cflags), extra_ldflags=list(spec.ldflags),
                   extra_include_paths=list(spec.include_dirs + spec.cuda_include_dirs),
                   build_directory=build_dir, with_cuda=spec.with_cuda, is_python_module=False, verbose=False)
    except Exception as e:
        raise BuildError(_failure(e, build_dir)) from e
    check_links_shared_libstdcxx(lib)  # before done.json: a refused build is not cached as finished
    record = dict(key_fields(spec), library=os.path.basename(lib), seconds=round(time.monotonic() - t0, 1))
    tmp = f"{done}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, done)  # atomic: a reader sees a finished build or none


def announcement(spec: Spec, build_dir: str) -> str:
    """The one line printed while building: what, how long to expect, where."""
    import torch

    parts = [k for k, on in (("CPU", _has(spec, "cpu")), ("CUDA", _has(spec, "cuda"))) if on]
    what = f"its C++ ops ({' and '.join(parts)} kernels)" if parts else f"the extension {spec.name}"
    return (f"ep_kernels: compiling {what} for torch {torch.__version__} on first use, {estimate(spec)}; "
            f"once per torch version, cached in {build_dir}")


def estimate(spec: Spec) -> str:
    """Expected wall time here: the measured compiler CPU time over the cores ninja can use
    (one file per core, so no more cores than files), plus 20% for the end of the build, where
    the last files compile alone (measured: 88 s wall for 150 s of CPU on 2 cores)."""
    cpu_s = sum(s for kind, s in _COMPILE_CPU_SECONDS.items() if _has(spec, kind)) or 10
    cores = os.cpu_count() or 1
    wall = max(10.0, 1.2 * cpu_s / min(cores, max(1, len(spec.sources))))
    shown = f"{wall / 60:.1f} min" if wall >= 45 else f"{round(wall, -1):.0f} s"
    return f"about {shown} with {cores} cores"


def _has(spec: Spec, kind: str) -> bool:
    """Whether spec compiles csrc/<kind>/ (kind: cpu or cuda)."""
    return any(os.path.basename(os.path.dirname(s)) == kind for s in spec.sources)


def _ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH. The pip package ``ninja`` (a dependency) puts it
    in the environment's bin folder, which is not on PATH when Python is run by its full path
    without activating the venv: add the package's own copy then."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return  # cpp_extension then says "Ninja is required to load C++ extensions"
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _failure(error: Exception, build_dir: str, lines: int = 20) -> str:
    """The build's error, short: cpp_extension puts the whole compiler output in it, which goes
    to ``build.log``; the message keeps its last lines."""
    text = str(error)
    log_path = os.path.join(build_dir, "build.log")
    with contextlib.suppress(OSError), open(log_path, "w") as f:
        f.write(text)
    tail = text.strip().splitlines()[-lines:]
    return f"{type(error).__name__}: " + "\n".join(tail) + f"\n(full output: {log_path})"
