"""The build of the compiled ops (ep_kernels/_build.py, ep_kernels/_ext.py): the cache key, the
lock that makes concurrent processes build once, the refusal of an ahead-of-time build made for
another torch, and what happens when the first-use build fails.

Nothing here compiles ep_kernels' own kernels (a minute); the builds are of a one-op probe
extension (about 10 s), through the same code path (``ops_spec`` flags, ``build_and_load``),
in subprocesses, so that the library loads into a fresh process each time.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from ep_kernels import _build, _ext

PROBE_CPP = """\
#include <ATen/core/Tensor.h>
#include <torch/library.h>
at::Tensor twice(const at::Tensor& x) { return x.mul(2); }
TORCH_LIBRARY(ep_build_probe, m) { m.def("twice(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(ep_build_probe, CPU, m) { m.impl("twice", &twice); }
"""

# Build the probe with build_and_load, call its op, print what happened as JSON (stdout).
PROBE_SCRIPT = """\
import dataclasses, json, sys, time, torch
from ep_kernels import _build
csrc, root, flag = sys.argv[1:4]
spec = _build.ops_spec(csrc=csrc)
spec = dataclasses.replace(spec, name="ep_build_probe", cflags=spec.cflags + ((flag,) if flag else ()))
t = time.time()
lib = _build.build_and_load(spec, root=root)
out = torch.ops.ep_build_probe.twice(torch.ones(3)).tolist()
print(json.dumps({"lib": lib, "out": out, "seconds": time.time() - t}))
"""


@pytest.fixture
def probe(tmp_path):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "probe.cpp").write_text(PROBE_CPP)
    script = tmp_path / "probe.py"
    script.write_text(PROBE_SCRIPT)
    return types.SimpleNamespace(csrc=str(csrc), root=str(tmp_path / "cache"), script=str(script))


def _start_probe(probe, flag=""):
    return subprocess.Popen([sys.executable, str(probe.script), probe.csrc, probe.root, flag],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, EP_KERNELS_NO_CUDA="1"))


def _finish(proc, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # a hung build (waiting on a stale lock) must not outlive the test
        proc.communicate()
        raise
    assert proc.returncode == 0, f"probe build failed:\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1]), err


def _probe_spec(probe, **changes):
    spec = dataclasses.replace(_build.ops_spec(csrc=probe.csrc), name="ep_build_probe")
    return dataclasses.replace(spec, **changes)


# --------------------------------------------------------------------------------------------
# the build description and the cache key
# --------------------------------------------------------------------------------------------

def test_ops_spec_is_the_source_tree(monkeypatch):
    monkeypatch.setenv("EP_KERNELS_NO_CUDA", "1")
    spec = _build.ops_spec()
    csrc = _build.csrc_dir()
    rel = sorted(os.path.relpath(s, csrc) for s in spec.sources)
    assert "ep_kernels.cpp" in rel
    assert {r for r in rel if r.startswith("cpu" + os.sep)} == \
        {os.path.join("cpu", f) for f in os.listdir(os.path.join(csrc, "cpu")) if f.endswith(".cpp")}
    assert not any(r.endswith(".cu") for r in rel)
    assert (spec.with_cuda, spec.cuda_reason) == (False, "EP_KERNELS_NO_CUDA=1")
    assert "-fopenmp" in spec.cflags and "-fopenmp" in spec.ldflags
    assert f"-std={_build.cxx_standard()}" in spec.cflags


def test_cuda_decision_on_a_cpu_torch(monkeypatch):
    monkeypatch.delenv("EP_KERNELS_NO_CUDA", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _build.cuda_decision() == (False, f"torch {torch.__version__} is not a CUDA build")


def test_cache_key_changes_with_what_the_binary_depends_on(probe, monkeypatch, tmp_path):
    spec = _probe_spec(probe)
    key = _build.cache_key(spec)
    assert key == _build.cache_key(_probe_spec(probe)), "the key must be stable"
    assert key.startswith(f"ep_build_probe-torch{torch.__version__}-{sys.implementation.cache_tag}-")
    # the same sources elsewhere (another venv) share the build
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "probe.cpp").write_text(PROBE_CPP)
    assert _build.cache_key(dataclasses.replace(spec, csrc=str(other), sources=(str(other / "probe.cpp"),),
                                                include_dirs=(str(other),))) == key

    changed = {"flags": _build.cache_key(dataclasses.replace(spec, cflags=spec.cflags + ("-DX",)))}
    (tmp_path / "csrc" / "extra.h").write_text("// a header changes the build too\n")
    changed["header"] = _build.cache_key(spec)
    os.remove(tmp_path / "csrc" / "extra.h")
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "9.9.9")
        changed["torch"] = _build.cache_key(spec)
    with monkeypatch.context() as m:
        m.setattr(torch.version, "cuda", "99.0")
        changed["cuda"] = _build.cache_key(spec)
    with monkeypatch.context() as m:
        m.setattr(_build.sysconfig, "get_config_var", lambda name: ".cpython-399-x86_64-linux-gnu.so")
        changed["python"] = _build.cache_key(spec)
    with monkeypatch.context() as m:
        m.setenv("CXX", "clang++")
        changed["compiler"] = _build.cache_key(spec)
    cuda = dataclasses.replace(spec, with_cuda=True)
    with monkeypatch.context() as m:
        m.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "device_count", lambda: 1)
        m.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
        changed["cuda kernels"] = _build.cache_key(cuda)
        m.setattr(torch.cuda, "get_device_capability", lambda i: (8, 0))
        changed["another GPU"] = _build.cache_key(cuda)
        m.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # ("9.0" is the visible GPU's: the same binary, the same key)
        changed["arch list"] = _build.cache_key(cuda)
    assert _build.cache_key(spec) == key
    assert all(k != key for k in changed.values()), changed
    assert len(set(changed.values())) == len(changed)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("EP_KERNELS_CACHE", str(tmp_path / "c"))
    assert _build.cache_root() == str(tmp_path / "c")
    monkeypatch.delenv("EP_KERNELS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_root() == str(tmp_path / "xdg" / "ep_kernels")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _build.cache_root() == os.path.join(os.path.expanduser("~"), ".cache", "ep_kernels")


def test_announcement_is_one_line_with_a_time(monkeypatch):
    monkeypatch.setenv("EP_KERNELS_NO_CUDA", "1")
    line = _build.announcement(_build.ops_spec(), "/cache/dir")
    assert "\n" not in line
    assert "CPU kernels" in line and torch.__version__ in line and "/cache/dir" in line
    assert f"with {os.cpu_count()} cores" in line and ("min" in line or " s " in line)


# --------------------------------------------------------------------------------------------
# the lock
# --------------------------------------------------------------------------------------------

HOLD_LOCK = """\
import sys, time
sys.path.insert(0, sys.argv[2])
import _build
with _build.file_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""

HOLD_BATON = """\
import sys, time
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _killed_holder(script, path):
    """Start a process that takes a lock at ``path``, then SIGKILL it while it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), os.path.dirname(_build.__file__)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_the_lock_excludes_and_dies_with_its_holder(tmp_path):
    """Why build_and_load takes a flock rather than trusting cpp_extension's FileBaton: a
    FileBaton whose holder was killed stays taken, so every later load() would wait forever;
    the flock is free as soon as its holder is gone."""
    import fcntl

    from torch.utils.file_baton import FileBaton

    baton = tmp_path / "baton"
    holder = _killed_holder(HOLD_BATON, baton)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert not FileBaton(str(baton)).try_acquire(), "a dead holder's FileBaton is expected to stay taken"

    lock = tmp_path / "lock"
    holder = _killed_holder(HOLD_LOCK, lock)
    fd = os.open(lock, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # held: another process cannot take it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the holder is dead
    finally:
        os.close(fd)


# Build the probe under a C++ compiler that links libstdc++ statically (as the GPU machines'
# /opt/gcc/bin/g++ does): with ops_spec's link flags, or without the one that names the shared
# libstdc++ first. Prints what the built library links, or the refusal.
STATIC_LIBSTDCXX_SCRIPT = """\
import dataclasses, json, sys, torch
from ep_kernels import _build
csrc, root, with_fix = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
spec = _build.ops_spec(csrc=csrc)
ldflags = spec.ldflags if with_fix else tuple(f for f in spec.ldflags if f not in _build.LINK_SHARED_LIBSTDCXX)
spec = dataclasses.replace(spec, name="ep_build_probe", ldflags=ldflags)
try:
    lib = _build.build_and_load(spec, root=root)
except _build.BuildError as e:
    print(json.dumps({"refused": str(e)}))
    sys.exit(0)
print(json.dumps({"needed": _build.needed_libraries(lib), "out": torch.ops.ep_build_probe.twice(torch.ones(2)).tolist()}))
"""


@pytest.mark.parametrize("with_fix", [True, False], ids=["ops_spec_flags", "without_the_shared_libstdcxx_flag"])
def test_a_compiler_that_links_libstdcxx_statically(probe, tmp_path, with_fix):
    """A second, static libstdc++ in the library crashed at the first formatted number on the GPU
    machine (gcc 13 static beside a newer shared one). ops_spec's link flags make the linker take
    the shared one even under such a compiler; a library built without them is refused, loudly,
    before any op runs (not cached as a finished build)."""
    wrapper = tmp_path / "g++-static"
    wrapper.write_text('#!/bin/sh\nexec "${EP_TEST_REAL_CXX:-c++}" "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    script = tmp_path / "static.py"
    script.write_text(STATIC_LIBSTDCXX_SCRIPT)
    env = dict(os.environ, EP_KERNELS_NO_CUDA="1", CXX=str(wrapper),
               EP_TEST_REAL_CXX=os.environ.get("CXX", "c++"))
    proc = subprocess.Popen([sys.executable, str(script), probe.csrc, probe.root, "1" if with_fix else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    result, _ = _finish(proc)
    if with_fix:
        assert any(n.startswith("libstdc++.so") for n in result["needed"]), result
        assert result["out"] == [2.0, 2.0]
    else:
        assert "carries its own static copy of libstdc++" in result["refused"], result
        assert f"CXX={wrapper}" in result["refused"]
        assert not list((tmp_path / "cache").rglob("done.json"))  # the refused build is not cached


def test_needed_libraries_reads_elf_only(tmp_path):
    """The DT_NEEDED reader: the loaded library's own list, and None for a file that is not ELF."""
    needed = _build.needed_libraries(torch._C.__file__)
    assert any(n.startswith("libtorch_python") for n in needed), needed
    not_elf = tmp_path / "x.so"
    not_elf.write_bytes(b"#!/bin/sh\n" + bytes(100))
    assert _build.needed_libraries(str(not_elf)) is None
    _build.check_links_shared_libstdcxx(str(not_elf))  # unknown format: not refused


def test_two_processes_build_once(probe):
    """Two processes started together with an empty cache: one compiles (and says so, in one
    line), the other waits for it and loads its result; both run the op."""
    procs = [_start_probe(probe) for _ in range(2)]
    results = [_finish(p) for p in procs]
    assert [r["out"] for r, _ in results] == [[2.0, 2.0, 2.0]] * 2
    announced = [line for _, err in results for line in err.splitlines() if line.startswith("ep_kernels: compiling")]
    assert len(announced) == 1, [err for _, err in results]
    build_dir = os.path.dirname(results[0][0]["lib"])
    assert results[1][0]["lib"] == results[0][0]["lib"]
    with open(os.path.join(build_dir, ".ninja_log")) as f:
        built = [line.split("\t")[3] for line in f if not line.startswith("#")]
    assert sorted(built) == ["ep_build_probe.so", "probe.o"], built  # ninja ran its steps once
    # a third process finds the finished build: no compile, no announcement
    third, err = _finish(_start_probe(probe))
    assert third["lib"] == results[0][0]["lib"] and "compiling" not in err


def test_a_stale_baton_does_not_block_the_build(probe):
    """A build killed mid-way leaves cpp_extension's FileBaton ('lock') in its folder; the next
    build must not wait on it forever (the subprocess timeout fails the test if it does)."""
    build_dir = os.path.join(probe.root, _build.cache_key(_probe_spec(probe)))
    os.makedirs(build_dir)
    open(os.path.join(build_dir, "lock"), "w").close()
    result, err = _finish(_start_probe(probe), timeout=120)
    assert result["out"] == [2.0, 2.0, 2.0] and "compiling" in err


# --------------------------------------------------------------------------------------------
# ep_kernels._ext: refusal, laziness, fallback
# --------------------------------------------------------------------------------------------

def test_a_build_for_another_torch_is_refused(monkeypatch):
    info = types.SimpleNamespace(TORCH_VERSION="1.0.0", TORCH_CUDA=None, CUDA_KERNELS=False)
    monkeypatch.setattr(_ext, "_build_info", lambda: info)
    monkeypatch.setattr(_ext, "_LOADED", False)
    monkeypatch.setattr(_ext, "_LOAD_ERROR", None)
    assert not _ext.compiled_available()
    assert f"built against torch 1.0.0 but torch {torch.__version__} is running" in _ext.load_error()
    with pytest.raises(RuntimeError, match=r"'cpu' was asked for.*pip install --no-build-isolation --force-reinstall"):
        _ext.require_compiled("cpu")


# A process where ep_kernels has no ahead-of-time build (as after a plain `pip install .`).
FIRST_USE = """\
import sys
sys.modules["ep_kernels._build_info"] = None  # importing it now raises ImportError
"""


def _run_first_use(code, env, timeout=120):
    return subprocess.run([sys.executable, "-c", FIRST_USE + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **env))


def test_import_compiles_nothing(tmp_path):
    cache = tmp_path / "cache"
    r = _run_first_use("""
        import ep_kernels, ep_kernels.ops, ep_kernels.network
        from ep_kernels import _ext
        assert not _ext.loaded()
        assert _ext._build_info() is None
        print("ok")
    """, {"EP_KERNELS_CACHE": str(cache)})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert not cache.exists(), os.listdir(cache)


FAILING_CXX = """\
#!/bin/sh
# a compiler that identifies itself like gcc (cpp_extension asks) but cannot compile
case "$1" in -v|--version|-dumpversion) exec g++ "$@";; esac
echo "simulated compiler failure" >&2
exit 1
"""


def test_a_failed_first_use_build_falls_back_or_raises(tmp_path):
    cxx = tmp_path / "failing-c++"
    cxx.write_text(FAILING_CXX)
    cxx.chmod(0o755)
    env = {"EP_KERNELS_CACHE": str(tmp_path / "cache"), "CXX": str(cxx), "EP_KERNELS_NO_CUDA": "1",
           "EP_KERNELS_BACKEND": ""}
    r = _run_first_use("""
        import warnings, torch, ep_kernels
        from ep_kernels import _backend, _ext
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert _backend.backend_for(torch.device("cpu")) == "reference"
        assert any("could not compile" in str(x.message) for x in w), [str(x.message) for x in w]
        try:
            with ep_kernels.use_backend("cpu"):
                _backend.backend_for(torch.device("cpu"))
        except RuntimeError as e:
            print("RAISED", e)
    """, env)
    assert r.returncode == 0, r.stderr
    assert "RAISED backend 'cpu' was asked for but is unavailable" in r.stdout, r.stdout
    assert "simulated compiler failure" in r.stdout, r.stdout
    assert r.stderr.count("ep_kernels: compiling") == 1, r.stderr  # one attempt per process, announced
    (build_dir,) = [d for d in (tmp_path / "cache").iterdir() if d.is_dir()]
    assert not (build_dir / "done.json").exists(), "a failed build must not count as done"
    assert "simulated compiler failure" in (build_dir / "build.log").read_text()
