#!/usr/bin/env bash
# Compile ep_kernels' CUDA kernels (csrc/cuda/*.cu) against a CUDA build of torch, on a machine
# without a GPU: nothing runs on a device. Proves the CUDA sources build; the result is then
# imported to check that its CUDA kernels register with the dispatcher.
#
# A second virtual environment gets torch==2.14.1 (CUDA 13.0, like the toolkit's nvcc; about
# 5.4 GB with its nvidia-* wheels, ~45 s from local disk). The working tree is left alone.
#
#   bash .ci/compile_cuda.sh          # the CUDA sources + the op schemas, through ep_kernels/_build.py
#                                     # (the first-use build's code); ~2 min of nvcc on 2 cores: what CI runs
#   bash .ci/compile_cuda.sh --full   # setup.py's CUDAExtension build (CPU and CUDA kernels) in a copy
#                                     # of the tree: the path `pip install .` takes; ~5 min on 2 cores
# Env: EP_CUDA_VENV (reuse a venv), TORCH_CUDA_ARCH_LIST (default 9.0: H100/H200),
#      EP_CUDA_TORCH (default torch==2.14.1), CUDA_HOME (default /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="$(pwd)"
T0=$(date +%s)
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "compile_cuda: no nvcc in $CUDA_HOME/bin: skipped (set CUDA_HOME)"
    exit 0
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
VENV="${EP_CUDA_VENV:-$WORK/venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install --quiet "${EP_CUDA_TORCH:-torch==2.14.1}" ninja setuptools numpy
T1=$(date +%s)
echo "compile_cuda: torch $(python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') installed in $((T1 - T0)) s; nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -1)"
if [ "${1:-}" != "--full" ]; then
    # The same code as ep_kernels' first-use build (ep_kernels/_build.py, loaded by path: the
    # package is not installed in this venv): its spec without the CPU kernels, its cache and lock.
    python - "$SRC" "$WORK/cache" <<'PY'
import importlib.util, os, resource, sys, time
import torch

src, cache = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("_ep_kernels_build", os.path.join(src, "ep_kernels", "_build.py"))
_build = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = _build
spec.loader.exec_module(_build)
ops = _build.ops_spec(csrc=os.path.join(src, "csrc"), cpu=False)
assert ops.with_cuda, f"compile_cuda: ep_kernels' build would skip the CUDA kernels here: {ops.cuda_reason}"
print("compile_cuda: nvcc", " ".join(os.path.relpath(s_, src) for s_ in ops.sources if s_.endswith(".cu")),
      f"({' '.join(ops.cuda_cflags)}, sm {os.environ['TORCH_CUDA_ARCH_LIST']})", flush=True)
t = time.time()
lib = _build.build_and_load(ops, root=cache)
cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"compile_cuda: compiled and loaded {os.path.basename(lib)} in {time.time() - t:.0f} s "
      f"({cpu.ru_utime + cpu.ru_stime:.0f} s of compiler CPU time)")
names = ["conv_pool_drive", "pool_conv_transpose", "state_update", "contrastive_conv_grad"]
missing = [o for o in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ep_kernels::{o}", "CUDA")]
assert not missing, f"CUDA kernels not registered: {missing}"
print("compile_cuda: CUDA kernels registered for", ", ".join(names))
PY
else
    # A copy of the sources (tracked and untracked files, no build outputs).
    mkdir -p "$WORK/src"
    tar -C "$SRC" --exclude=.git --exclude='*.so' --exclude=build --exclude='*.egg-info' --exclude=__pycache__ \
        --exclude=bench/results -cf - . | tar -C "$WORK/src" -xf -
    cd "$WORK/src"
    MAX_JOBS="${MAX_JOBS:-2}" python setup.py build_ext --inplace > "$WORK/build.log" 2>&1 || true
    grep -E "^ep_kernels:" "$WORK/build.log" || true
    T2=$(date +%s)
    SO=$(ls ep_kernels/_C*.so 2>/dev/null || true)
    if [ -z "$SO" ]; then
        echo "compile_cuda: FAILED, no extension built; the end of the log:"
        tail -60 "$WORK/build.log"
        exit 1
    fi
    echo "compile_cuda: built $(basename "$SO") ($(du -h "$SO" | cut -f1)) in $((T2 - T1)) s"
    # Load it (no GPU needed): the CUDA and CPU kernels must be registered with the dispatcher.
    python - <<'PY'
import torch
import ep_kernels._C  # noqa: F401
ops = ["conv_pool_drive", "pool_conv_transpose", "state_update", "contrastive_conv_grad"]
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ep_kernels::{o}", "CUDA")]
cpu = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ep_kernels::{o}", "CPU")]
assert not missing and not cpu, f"kernels not registered: CUDA {missing}, CPU {cpu}"
print("compile_cuda: the extension loads; CUDA and CPU kernels registered for", ", ".join(ops))
PY
fi
echo "compile_cuda: OK in $(( $(date +%s) - T0 )) s in all"
