#!/usr/bin/env bash
# CI: the CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer (issue 11, "Keep it from
# coming back"). Builds csrc/ep_kernels.cpp + csrc/cpu/*.cpp with the sanitizers into a temporary
# folder (the sources, C++ standard, include folder and flags are ep_kernels/_build.py's, loaded by
# path; the sanitizer flags are added), then runs .ci/sanitize_fuzz.py once per ISA code path
# (EP_KERNELS_ISA unset / avx2 / generic; on a CPU without AVX-512 the first is the AVX2 path
# again), each in a Python process with the ASan and UBSan runtimes preloaded. That script loads
# the sanitized library with torch.ops.load_library (never ep_kernels' own extension), fuzzes
# random geometries of the four ops against their plain-torch references, extreme geometry
# integers, crafted index tensors and huge legal geometries, and exits non-zero on any mismatch;
# a sanitizer report ends the process at once (exit 86 ASan, 87 UBSan). Exits non-zero if any run failed.
#
# Time, measured on 2 cores shared with other jobs (load 3-4): 242 s in all (build 188 s: 181 s of
# compiler CPU at -O0, ~1.5 min on 2 idle cores; the three fuzz runs side by side 53 s, to the
# huge-geometry part), 251 s of CPU. CI's budget for it: about 4-5 minutes.
# Environment: EP_SANITIZE_CASES (random geometries per ISA path, each through the four ops;
# default 250; crafted-index geometries are a tenth of it, huge geometries half),
# EP_SANITIZE_SEED (default 0), EP_SANITIZE_LIB=<path> (skip the build: reuse a sanitized library),
# EP_SANITIZE_KEEP=1 (keep the temporary folder), EP_SANITIZE_OPT (default -O0),
# EP_SANITIZE_TIMEOUT (seconds per fuzz run, default 600), PYTHON (default python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
T0=$(date +%s)
WORK="$(mktemp -d)"
[ "${EP_SANITIZE_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT

LIB="${EP_SANITIZE_LIB:-}"
if [ -z "$LIB" ]; then
  LIB="$WORK/libep_kernels_sanitized.so"
  # The one build description (ep_kernels/_build.py: sources, -std, include folder, -fopenmp at
  # compile and link; its -O3 replaced, see below), plus torch's headers and libraries, plus the
  # sanitizers; a plain g++ per source, as many at once as there are cores, then one link.
  EP_KERNELS_NO_CUDA=1 "$PY" - "$WORK" "$LIB" <<'PY'
import importlib.util, os, shlex, subprocess, sys, sysconfig, time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils import cpp_extension

work, lib = sys.argv[1:3]
spec_py = importlib.util.spec_from_file_location("ep_kernels_build", os.path.join("ep_kernels", "_build.py"))
build = importlib.util.module_from_spec(spec_py)
spec_py.loader.exec_module(build)
spec = build.ops_spec(os.path.abspath("csrc"), cpu=True)  # EP_KERNELS_NO_CUDA=1: the CPU kernels only
assert not spec.with_cuda and spec.sources and all(s.endswith(".cpp") for s in spec.sources), spec.sources

SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
cxx = "g++"  # the runtimes preloaded below are gcc's (gcc -print-file-name)
abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
includes = [f"-I{d}" for d in spec.include_dirs] + [f"-isystem{d}" for d in cpp_extension.include_paths()]
includes.append(f"-isystem{sysconfig.get_paths()['include']}")
# The spec's flags but its -O3: with both sanitizers -O3 took over 210 s of compiler CPU for
# contrastive_conv_grad.cpp alone (killed unfinished), -O1 270 s for the five sources, -O0 166-181 s;
# the fuzzing's time is Python's and the references' (the sanitized kernels run on small tensors):
# no slower at -O0 than at -O1 here. -O0 also leaves no undefined behaviour optimised away before
# the sanitizers see it. EP_SANITIZE_OPT overrides it (e.g. -O1, ASan's usual recommendation).
opt = os.environ.get("EP_SANITIZE_OPT", "-O0")
base = [f for f in spec.cflags if not f.startswith("-O")] + [opt]
cflags = (["-fPIC", "-g1", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
          + base + SANITIZE + includes)
ldflags = (["-shared"] + list(spec.ldflags) + SANITIZE
           + [f"-L{d}" for d in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch"]
           + [f"-Wl,-rpath,{d}" for d in cpp_extension.library_paths()])


def compile_one(src):
    """Compile one source; returns (object, compiler CPU seconds)."""
    obj = os.path.join(work, os.path.relpath(src, spec.csrc).replace(os.sep, "_") + ".o")
    cmd = [cxx, "-c", src, "-o", obj] + cflags
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        sys.exit(f"sanitize: compile failed: {shlex.join(cmd)}\n{out}")
    return obj, usage.ru_utime + usage.ru_stime


t = time.time()
print(f"sanitize: compiling {len(spec.sources)} sources with {' '.join(base + SANITIZE)}, {os.cpu_count()} jobs",
      flush=True)
with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    done = list(pool.map(compile_one, spec.sources))
objs = [o for o, _ in done]
cpu = ", ".join(f"{os.path.basename(s)} {c:.0f} s" for s, (_, c) in zip(spec.sources, done))
cmd = [cxx] + objs + ["-o", lib] + ldflags
r = subprocess.run(cmd, capture_output=True, text=True)
if r.returncode:
    sys.exit(f"sanitize: link failed: {shlex.join(cmd)}\n{r.stdout}{r.stderr}")
print(f"sanitize: built {lib} in {time.time() - t:.0f} s (compiler CPU: {cpu})", flush=True)
PY
fi
T_BUILD=$(( $(date +%s) - T0 ))
# Instrumented for both sanitizers (calls into their runtimes), or this job would prove nothing.
SYMS="$(nm -D --undefined-only "$LIB")"  # (not piped into grep -q: pipefail would see nm's SIGPIPE)
grep -q __asan_report <<< "$SYMS" || { echo "sanitize: $LIB has no ASan instrumentation" >&2; exit 1; }
grep -q __ubsan_handle <<< "$SYMS" || { echo "sanitize: $LIB has no UBSan instrumentation" >&2; exit 1; }

# The sanitizer runtimes first in the process (the library needs them loaded before itself).
# detect_leaks=0: CPython leaks by design. allocator_may_return_null + max_allocation_size_mb: an
# honestly huge tensor request (e.g. an extreme geometry that passes the checks) fails as torch's
# "not enough memory" RuntimeError instead of exhausting the machine.
ASAN_RT="$(gcc -print-file-name=libasan.so)"
UBSAN_RT="$(gcc -print-file-name=libubsan.so)"
[ -f "$ASAN_RT" ] && [ -f "$UBSAN_RT" ] || { echo "sanitize: no libasan/libubsan next to gcc" >&2; exit 1; }
export ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:halt_on_error=1:abort_on_error=0:exitcode=86:allocator_may_return_null=1:max_allocation_size_mb=2048:detect_stack_use_after_return=0:strict_string_checks=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87"
# Two threads per run: the kernels' parallel paths and their task splits run. The three ISA runs go
# side by side (the fuzzing is mostly single-threaded Python: two cores take two at once); PASSIVE:
# OpenMP threads sleep rather than spin while another run has the core. Each run's log is shown
# after all three are done, in order.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OMP_WAIT_POLICY=PASSIVE
unset EP_KERNELS_BACKEND
ISAS=(native avx2 generic)
pids=()
for isa in "${ISAS[@]}"; do
  (
    if [ "$isa" = native ]; then unset EP_KERNELS_ISA; else export EP_KERNELS_ISA="$isa"; fi
    T1=$(date +%s)
    rc=0
    timeout "${EP_SANITIZE_TIMEOUT:-600}" env LD_PRELOAD="$ASAN_RT:$UBSAN_RT" "$PY" .ci/sanitize_fuzz.py --lib "$LIB" \
        --isa "$isa" --cases "${EP_SANITIZE_CASES:-250}" --seed "${EP_SANITIZE_SEED:-0}" \
        --trace "$WORK/case-$isa.txt" || rc=$?
    echo "$(( $(date +%s) - T1 ))" > "$WORK/seconds-$isa"
    exit "$rc"
  ) > "$WORK/fuzz-$isa.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!ISAS[@]}"; do
  isa="${ISAS[$i]}"
  rc=0
  wait "${pids[$i]}" || rc=$?
  cat "$WORK/fuzz-$isa.log"
  secs="$(cat "$WORK/seconds-$isa" 2>/dev/null || echo '?')"
  if [ "$rc" = 0 ]; then
    echo "sanitize: ISA path '$isa' OK in $secs s"
  else
    case "$rc" in
      86) why="AddressSanitizer report";; 87) why="UndefinedBehaviorSanitizer report";;
      1) why="a mismatch or a wrong refusal, listed above";; 124) why="timed out";; *) why="crashed";;
    esac
    echo "sanitize: ISA path '$isa' FAILED after $secs s (exit $rc: $why)" >&2
    if [ "$rc" != 1 ]; then
      echo "sanitize: the case running then (reproduce: .ci/sanitize_fuzz.py's docstring):" >&2
      cat "$WORK/case-$isa.txt" >&2 2>/dev/null || true
    fi
    status=1
  fi
done
echo "sanitize: build ${T_BUILD} s, total $(( $(date +%s) - T0 )) s"
exit $status
