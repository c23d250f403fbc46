#!/usr/bin/env bash
# The prepared GPU check (issue 6): build ep_kernels with its CUDA kernels on the GPU machine,
# check every GPU op (triton and cuda backends) against the reference at several shapes, run
# ep-gradcheck in float64, compare CUDA-graph phases with eager ones, and time one relaxation
# step and one full ep_backward of VGG-5 at batch 128 for every path. Prints one table; writes
# JSON and the logs to $OUT (the run tool's output folder) or bench/results. Under 5 minutes.
#
#   bash bench/gpu_check.sh                 # everything
#   GPU_CHECK_ARGS="--no-compile" bash bench/gpu_check.sh
#
# Needs: torch with CUDA, triton, ninja, and nvcc for the CUDA kernels (CUDA_HOME or
# /usr/local/cuda; without it the build is CPU-only and the 'cuda' backend is reported missing).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
OUTDIR="${OUT:-bench/results}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check-build.log"
echo "gpu_check: $(date -Is) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"

# -- build (in place; the CPU kernels too, so the package is whole) --------------------------
if [ -z "${CUDA_HOME:-}" ]; then
    for d in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12.8; do
        if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
    done
fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0); print(f"{c[0]}.{c[1]}")')}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# The GPU machines' $CXX (/opt/gcc/bin/g++) links libstdc++ statically: the build refuses that
# library (it crashed at its first formatted message; ep_kernels/_build.py). The system's g++ is right.
if [ -z "${EP_GPU_CHECK_CXX:-}" ] && [ -x /usr/bin/g++ ]; then EP_GPU_CHECK_CXX=/usr/bin/g++; fi
[ -n "${EP_GPU_CHECK_CXX:-}" ] && export CXX="$EP_GPU_CHECK_CXX"
python3 -c "import ninja" 2>/dev/null || echo "gpu_check: warning: the ninja package is missing (pip install ninja): the build will be slow"
echo "gpu_check: building (CXX=${CXX:-unset}, CUDA_HOME=${CUDA_HOME:-none}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
timeout 200 python3 setup.py build_ext --inplace > "$LOG" 2>&1
BUILD_RC=$?
grep -E "^ep_kernels:" "$LOG" || true
T1=$(date +%s)
if [ $BUILD_RC -ne 0 ]; then
    echo "gpu_check: BUILD FAILED (rc $BUILD_RC) after $((T1 - T0)) s; the end of the log:"
    tail -40 "$LOG"
    echo "gpu_check: continuing without the compiled extension (triton and reference paths only)"
else
    echo "gpu_check: built in $((T1 - T0)) s"
fi

# -- the checks and timings ------------------------------------------------------------------
export PYTHONPATH="$(pwd):$(pwd)/python${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET EP_KERNELS_BACKEND EP_KERNELS_CUDA_GRAPHS
ELAPSED=$(( $(date +%s) - T0 ))
BUDGET=$(( 270 - ELAPSED ))   # the timing section skips what would run past ~4.5 min in all
[ $BUDGET -lt 60 ] && BUDGET=60
timeout $(( BUDGET + 40 )) python3 bench/gpu_check.py --out "$OUTDIR" --build-log "$LOG" --time-budget "$BUDGET" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$OUTDIR/gpu_check.log"
RC=${PIPESTATUS[0]}
echo "gpu_check: done in $(( $(date +%s) - T0 )) s (rc $RC); results in $OUTDIR/gpu_check-latest.json"
exit $RC
