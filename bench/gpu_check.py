"""The prepared GPU check (issue 6; DESIGN.md section 6): run by ``bench/gpu_check.sh`` on the
GPU machine after the build.

Sections (each one on its own: a failure is recorded and the rest still runs):

1. ``env``: the device, versions, which backends are available, the build log's verdict.
2. ``ops``: every GPU op of the ``triton`` and ``cuda`` backends against the plain-torch
   references at several shapes (the CPU tests' spread plus VGG-5's layer shapes), float32
   (TF32 off), float64 and bfloat16.
3. ``gradcheck``: ``ep-gradcheck`` in float64 on the GPU (EP of the fast path against the
   independent BPTT), per backend.
4. ``graphs``: the CUDA-graph path against the eager path (same states, same gradients).
5. ``timing``: VGG-5 at batch 128, float32 (torch's default TF32 setting for convolutions,
   the same for every path): one relaxation step and one full ``ep_backward`` (T1=250, T2=25,
   symmetric) for the autograd-of-Phi reference (``ep_reference``), the explicit path on the
   ``reference`` backend, ``torch.compile`` of the explicit step, and ours (triton, cuda,
   each eager and as CUDA graphs). Also the GPU's measured TF32 matrix rate, and the fraction
   of it a step reaches (dense-equivalent FLOPs).

Prints one table and writes everything as JSON (``--out``). ``--cpu-dry-run`` runs every
section on CPU with tiny shapes (Triton under its interpreter) to check the script itself.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, os.path.join(ROOT, "python")):
    if p not in sys.path:
        sys.path.insert(0, p)

DRY = "--cpu-dry-run" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPORT = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "sections": {}, "errors": {}}
T_START = time.time()
OUT_DIR = None


def log(*a):
    print(f"[{time.time() - T_START:6.1f}s]", *a, flush=True)


def run_section(name, fn, *args):
    t0 = time.time()
    log(f"== {name}")
    try:
        REPORT["sections"][name] = fn(*args)
    except Exception as e:  # noqa: BLE001 - every failure is reported, the rest still runs
        REPORT["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
        log(f"!! {name} failed: {type(e).__name__}: {str(e)[:500]}")
    REPORT.setdefault("section_seconds", {})[name] = round(time.time() - t0, 2)
    dump()


def dump():
    """Write the report so far (after every section and timing: a run cut short keeps its results)."""
    if OUT_DIR:
        os.makedirs(OUT_DIR, exist_ok=True)
        with open(os.path.join(OUT_DIR, "gpu_check-latest.json"), "w") as f:
            json.dump(REPORT, f, indent=1, default=str)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, reps, warmup=1):
    """Median wall time of ``fn`` (seconds), synchronising the GPU around each call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


# --------------------------------------------------------------------------------------------
# 1. environment
# --------------------------------------------------------------------------------------------

def sec_env(args, dev):
    import ep_kernels
    from ep_kernels import _backend

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "device": str(dev), "backends_available": ep_kernels.available_backends(),
            "cuda_kernels_compiled": _backend.cuda_kernels_available(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2 ** 30, 1))
    try:
        from ep_kernels import _build_info
        info["build"] = {k: getattr(_build_info, k) for k in dir(_build_info) if k.isupper()}
    except ImportError:
        info["build"] = None
    if args.build_log and os.path.exists(args.build_log):
        with open(args.build_log, errors="replace") as f:
            lines = [line.rstrip() for line in f if line.startswith("ep_kernels:")]
        info["build_log"] = lines[-3:]
    for k, v in info.items():
        log(f"   {k}: {v}")
    return info


# --------------------------------------------------------------------------------------------
# 2. ops against the references
# --------------------------------------------------------------------------------------------

# (N, C_in, C_out, H, W, kernel, padding, stride, dilation, groups, pool): tests/test_ops.py's
# spread, then VGG-5's four layers at a small batch.
CASES = [
    (2, 3, 5, 9, 11, 3, 1, 1, 1, 1, 2),
    (1, 4, 6, 8, 8, 3, 0, 1, 1, 1, 2),
    (2, 5, 7, 10, 9, 5, 2, 1, 1, 1, 3),
    (2, 6, 10, 7, 7, 3, 1, 1, 1, 1, 1),
    (2, 4, 6, 11, 12, 3, 1, 2, 1, 2, 2),
    (2, 3, 4, 12, 13, 3, 2, 1, 2, 1, 2),
    (2, 9, 12, 7, 10, (3, 5), (1, 2), 1, 1, 1, 2),
    (1, 17, 20, 6, 6, 3, 1, 1, 1, 1, 3),
    (8, 3, 128, 32, 32, 3, 1, 1, 1, 1, 2),
    (8, 128, 256, 16, 16, 3, 1, 1, 1, 1, 2),
    (8, 256, 512, 8, 8, 3, 1, 1, 1, 1, 2),
    (8, 512, 512, 4, 4, 3, 0, 1, 1, 1, 2),
]
DRY_CASES = CASES[:3] + [(2, 3, 8, 16, 16, 3, 1, 1, 1, 1, 2)]
TOL = {torch.float32: 1e-5, torch.float64: 1e-11, torch.bfloat16: 2e-2}


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _setup(case, dtype, dev, g):
    n, cin, cout, h, w, k, pad, stride, dil, groups, pool = case
    k, pad, stride, dil = _pair(k), _pair(pad), _pair(stride), _pair(dil)
    x = torch.rand(n, cin, h, w, generator=g, dtype=torch.float64)
    wt = (torch.rand(cout, cin // groups, *k, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(cin * k[0] * k[1])
    b = torch.rand(cout, generator=g, dtype=torch.float64) * 0.4 - 0.2
    conv = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    hc = (h + 2 * pad[0] - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
    wc = (w + 2 * pad[1] - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
    return [t.to(dtype).to(dev) for t in (x, wt, b)], conv, pool, [hc, wc]


def _rel(got, ref, scale):
    """max |got - ref| / (scale + |ref|), elementwise (scale: the computation on |inputs|)."""
    got, ref, scale = got.double(), ref.double(), scale.double()
    return ((got - ref).abs() / (scale + ref.abs() + 1e-300)).max().item() if got.numel() else 0.0


def check_ops(backend, dtype, dev, cases):
    """Every op of ``backend`` against its reference, per case; returns rows."""
    import ep_kernels.ops as ops
    from ep_kernels import use_backend

    g = torch.Generator().manual_seed(0)
    rows = []
    low = dtype == torch.bfloat16
    for ci, case in enumerate(cases):
        (x, w, b), conv, pool, (hc, wc) = _setup(case, dtype, dev, g)
        row = {"case": ci, "shape": str(case), "dtype": str(dtype).replace("torch.", "")}
        with use_backend(backend):
            d, i = ops.conv_pool_drive(x, w, b, pool=pool, **conv)
        rd, ri = ops.conv_pool_drive_ref(x, w, b, pool=pool, **conv)
        row["drive_rel"] = _rel(d, rd, torch.zeros_like(rd))
        row["argmax_mismatch"] = int((i != ri).sum()) if pool > 1 else 0
        # top-down with the reference's argmax and a state with exact zeros
        s = torch.rand(rd.shape, generator=g, dtype=torch.float64)
        s = s.masked_fill(torch.rand(rd.shape, generator=g) < 0.3, 0).to(dtype).to(dev)
        args = (list(x.shape[2:]), [hc, wc])
        with use_backend(backend):
            td = ops.pool_conv_transpose(s, ri, w, *args, pool=pool, **conv)
        up = (lambda t: t.double()) if low else (lambda t: t)
        rtd = ops.pool_conv_transpose_ref(up(s), ri, up(w), *args, pool=pool, **conv)
        sc = ops.pool_conv_transpose_ref(up(s).abs(), ri, up(w).abs(), *args, pool=pool, **conv)
        row["top_down_rel"] = _rel(td, rtd, sc)
        # contrastive: distinct inputs, and the same input for both states
        worst = 0.0
        for xb in (x.flip(0), x):
            s_b = s.flip(0)
            i_b = ri.flip(0) if pool > 1 else ri
            gw, gb = torch.zeros_like(w), torch.zeros_like(b)
            cargs = (x, s, ri, xb, s_b, i_b, [hc, wc], conv["stride"], conv["padding"], conv["dilation"],
                     conv["groups"], pool, -0.37)
            with use_backend(backend):
                ops.contrastive_conv_grad(*cargs, gw, gb)
            hi = [up(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in cargs]
            gw_r, gb_r = torch.zeros_like(up(w)), torch.zeros_like(up(b))
            ops.contrastive_conv_grad_ref(*hi, gw_r, gb_r)
            absg = torch.zeros_like(gw_r)
            for xx, ss, ii in ((hi[0], hi[1], ri), (hi[3], hi[4], i_b)):
                u = F.max_unpool2d(ss, ii, pool, pool, output_size=[hc, wc]) if pool > 1 else ss
                absg += torch.nn.grad.conv2d_weight(xx.abs(), w.shape, u.abs(), **conv)
            worst = max(worst, _rel(gw, gw_r, 0.37 * absg), _rel(gb, gb_r, torch.zeros_like(gb_r) + 1))
        row["contrastive_rel"] = worst
        prev = torch.rand_like(td)
        o, o_r = torch.empty_like(td), torch.empty_like(td)
        with use_backend(backend):
            ch = ops.state_update(td, td, None, prev, 0.5, o)
        ch_r = ops.state_update_ref(td, td, None, prev, 0.5, o_r)
        row["state_update_equal"] = bool(torch.equal(o, o_r)) if not low else bool((o.float() - o_r.float()).abs().max() <= 2 ** -7)
        row["change_equal"] = bool(torch.equal(ch, ch_r)) if not low else bool(abs(ch.float() - ch_r.float()) <= 2 ** -7)
        tol = TOL[dtype]
        # argmax: the same values give the same winners; allow 1 in 10^4 near-ties broken by a last-bit
        # difference of the convolution (bfloat16: not compared, its rounding makes ties common)
        allowed = i.numel() if low else i.numel() // 10000
        row["ok"] = (row["drive_rel"] <= tol and row["argmax_mismatch"] <= allowed and row["top_down_rel"] <= tol
                     and row["contrastive_rel"] <= tol * (10 if dtype == torch.float32 else 1)
                     and row["state_update_equal"] and row["change_equal"])
        rows.append(row)
    return rows


def sec_ops(args, dev):
    from ep_kernels import _backend

    backends = []
    if _backend.triton_installed():
        backends.append("triton")
    if dev.type == "cuda" and _backend.cuda_kernels_available():
        backends.append("cuda")
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 references
    out = {"backends": backends, "results": {}, "failures": []}
    try:
        for backend in backends:
            for dtype in (torch.float32, torch.float64, torch.bfloat16):
                key = f"{backend}/{str(dtype).replace('torch.', '')}"
                try:
                    rows = check_ops(backend, dtype, dev, DRY_CASES if DRY else CASES)
                except Exception as e:  # noqa: BLE001
                    out["failures"].append(f"{key}: {type(e).__name__}: {e}")
                    log(f"   {key}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    continue
                out["results"][key] = rows
                bad = [r for r in rows if not r["ok"]]
                worst = {k: max(r[k] for r in rows) for k in ("drive_rel", "top_down_rel", "contrastive_rel",
                                                             "argmax_mismatch")}
                log(f"   {key}: {len(rows) - len(bad)}/{len(rows)} cases ok; worst {worst}")
                if bad:
                    out["failures"].append(f"{key}: cases {[r['case'] for r in bad]}")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    out["all_ok"] = not out["failures"] and bool(backends)
    return out


# --------------------------------------------------------------------------------------------
# 3. ep-gradcheck (float64) on the device
# --------------------------------------------------------------------------------------------

def _small_net(dev, seed=0):
    from ep_kernels import EPConv2d, EPNetwork

    torch.manual_seed(seed)
    c1, c2 = (4, 6) if DRY else (16, 32)
    net = EPNetwork(EPConv2d(3, c1, 3, padding=1, pool=2), EPConv2d(c1, c2, 3, padding=1, pool=2),
                    readout=torch.nn.Linear(c2 * 4 * 4, 10), activation="hardsigmoid_half")
    return net.to(dev)


def sec_gradcheck(args, dev, backends):
    from ep_kernels import gradcheck, use_backend

    g = torch.Generator().manual_seed(3)
    n = 4 if DRY else 16
    x = torch.rand(n, 3, 16, 16, generator=g).to(dev)
    y = torch.randint(0, 10, (n,), generator=g).to(dev)
    T1, T2 = (20, 8) if DRY else (200, 60)
    out = {}
    for backend in ["reference"] + backends:
        t0 = time.time()
        with use_backend(backend):
            rep = gradcheck.gradcheck(_small_net(dev), x, y, beta=1e-3, T1=T1, T2=T2, dtype=torch.float64, gdu=False)
        cos = {k: v["cosine"] for k, v in rep["params"].items()}
        out[backend] = {"min_cosine": min(cos.values()), "cosine": cos,
                        "max_relerr": max(v["relerr"] for v in rep["params"].values()),
                        "residual_free": max(rep["residual"]["free"]), "seconds": round(time.time() - t0, 2)}
        log(f"   {backend}: min cosine {out[backend]['min_cosine']:.6f}, max relerr {out[backend]['max_relerr']:.2e} "
            f"({out[backend]['seconds']} s)")
    # TF32 (the default of torch's convolutions, followed by the Triton kernels): its effect on the
    # float32 EP gradient's agreement with BPTT, measured before it may stay a default
    if dev.type == "cuda":
        old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        try:
            for backend in backends or ["reference"]:
                for tf32 in (False, True):
                    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
                    with use_backend(backend):
                        rep = gradcheck.gradcheck(_small_net(dev), x, y, beta=1e-2, T1=T1, T2=T2,
                                                  dtype=torch.float32, gdu=False)
                    key = f"float32/{backend}/{'tf32' if tf32 else 'ieee'}"
                    out[key] = {"min_cosine": min(v["cosine"] for v in rep["params"].values()),
                                "max_relerr": max(v["relerr"] for v in rep["params"].values())}
                    log(f"   {key}: min cosine {out[key]['min_cosine']:.6f}, max relerr {out[key]['max_relerr']:.2e}")
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    return out


# --------------------------------------------------------------------------------------------
# 4. CUDA graphs against the eager path
# --------------------------------------------------------------------------------------------

def sec_graphs(args, dev, backends):
    from ep_kernels import cuda_graphs, use_backend

    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64).to(dev)
    y = torch.randint(0, 10, (6,), generator=g).to(dev)
    out = {}
    for backend in ["reference"] + backends:
        net = _small_net(dev, seed=2).double()
        res = {}
        for mode in ("eager", "graphs", "graphs-replay"):
            with use_backend(backend), cuda_graphs.use_cuda_graphs(mode != "eager", capture=dev.type == "cuda"):
                net.zero_grad(set_to_none=True)
                r = net.ep_backward(x, y, beta=0.2, T1=23, T2=7, keep_states=True, tol=1e-12)
                res[mode] = (r, {k: p.grad.clone() for k, p in net.named_parameters()})
        e_states, e_grads = res["eager"][0].states, res["eager"][1]
        row = {}
        for mode in ("graphs", "graphs-replay"):
            st, gr = res[mode][0].states, res[mode][1]
            row[mode] = {
                "states_max_abs_diff": max((a - b).abs().max().item() for ph in ("free", "plus", "minus")
                                           for a, b in zip(st[ph], e_states[ph])),
                "grads_max_rel_diff": max(((gr[k] - e_grads[k]).norm() / e_grads[k].norm().clamp_min(1e-300)).item()
                                          for k in e_grads),
                "steps_equal": res[mode][0].diagnostics["free"] == res["eager"][0].diagnostics["free"]}
        out[backend] = row
        log(f"   {backend}: {row}")
    return out


# --------------------------------------------------------------------------------------------
# 5. timing: VGG-5, batch 128
# --------------------------------------------------------------------------------------------

def vgg5(dev, ch):
    from ep_kernels import EPConv2d, EPNetwork

    torch.manual_seed(0)
    c = ch
    net = EPNetwork(EPConv2d(3, c[0], 3, padding=1, pool=2), EPConv2d(c[0], c[1], 3, padding=1, pool=2),
                    EPConv2d(c[1], c[2], 3, padding=1, pool=2), EPConv2d(c[2], c[3], 3, padding=0, pool=2),
                    readout=torch.nn.Linear(c[3], 10), activation="hardsigmoid_half")
    return net.to(dev)


def step_flops(net, x):
    """Dense-equivalent FLOPs of one explicit step: each layer's forward convolution and, above
    the first, its transposed convolution (2 x multiply-adds)."""
    total, shape = 0, tuple(x.shape[1:])
    for l, layer in enumerate(net.layers):
        h, w = layer.conv_out_size(shape[1:])
        kh, kw = layer.kernel_size
        f = 2 * x.shape[0] * layer.out_channels * h * w * layer.in_channels * kh * kw // layer.groups
        total += f * (2 if l > 0 else 1)
        shape = layer.state_shape(shape)
    return total


def matrix_rate(dev):
    """Measured TF32 matmul rate (FLOP/s) of this GPU (and float32 without TF32)."""
    n = 256 if DRY else 8192
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    old = torch.backends.cuda.matmul.allow_tf32
    out = {}
    try:
        for tf32 in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            t = timeit(lambda: a @ b, reps=3 if DRY else 10, warmup=2)
            out["tf32" if tf32 else "fp32"] = 2 * n ** 3 / t
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return out


def sec_timing(args, dev, backends):
    import ep_reference
    from ep_kernels import cuda_graphs, use_backend
    from ep_kernels.engine import ACTIVATION_GAIN, prepare_layers

    ch = (8, 16, 32, 32) if DRY else (128, 256, 512, 512)
    n = 4 if DRY else args.batch
    T1, T2 = (10, 3) if DRY else (args.T1, args.T2)
    reps = 2 if DRY else args.reps
    net = vgg5(dev, ch)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (n,), generator=g).to(dev)
    gain = ACTIVATION_GAIN[net.activation]
    with use_backend("reference"):
        states, _ = net.free_phase(x, T1=20)  # a mid-relaxation state, not zeros
    flops = step_flops(net, x)
    out = {"batch": n, "T1": T1, "T2": T2, "gflop_per_step_dense": flops / 1e9, "paths": {}}
    REPORT["sections"]["timing"] = out  # filled as it goes (dumped after every measurement)
    rates = matrix_rate(dev) if dev.type == "cuda" else {}
    out["matrix_rate_tflops"] = {k: v / 1e12 for k, v in rates.items()}
    budget_end = T_START + args.time_budget

    def record(path, key, fn, reps_):
        if time.time() > budget_end:
            out["paths"].setdefault(path, {})[key] = None
            out.setdefault("skipped_for_time", []).append(f"{path}/{key}")
            log(f"   {path} {key}: skipped (time budget)")
            return
        try:
            t = timeit(fn, reps_, warmup=1)
            out["paths"].setdefault(path, {})[key] = t
            log(f"   {path} {key}: {t * 1e3:.3f} ms")
        except Exception as e:  # noqa: BLE001
            out["paths"].setdefault(path, {})[key] = None
            out.setdefault("path_errors", {})[f"{path}/{key}"] = f"{type(e).__name__}: {str(e)[:800]}"
            log(f"   {path} {key}: FAILED {type(e).__name__}: {str(e)[:300]}")
        dump()

    ref = ep_reference.ReferenceNet.from_module(net)

    # -- one relaxation step
    record("autograd-phi (ep_reference)", "step_s", lambda: ep_reference.step(ref, x, states), reps)

    def eager_step_fn(backend):
        with use_backend(backend), torch.no_grad():
            prepared = prepare_layers(net.layers)
            first = net.layers[0].drive(x, prepared[0])
        shapes = [tuple(x.shape[1:])] + [tuple(s.shape[1:]) for s in states[:-1]]
        spare = [torch.empty_like(s) for s in states]

        def run():
            with use_backend(backend), torch.no_grad():
                cuda_graphs.step(net.layers, first, states, spare, shapes, prepared, None, gain)
        return run, first, shapes, prepared, spare

    run_ref, first_ref, shapes, prep_ref, spare_ref = eager_step_fn("reference")
    record("explicit (reference backend)", "step_s", run_ref, reps)

    compiled_step = None
    if not args.no_compile:
        try:
            import torch._dynamo as dynamo
            # static shapes, one compilation per layer shape (the wrappers' checks break the graph)
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            compiled_step = torch.compile(cuda_graphs.step, dynamic=False)

            def run_compiled():
                with use_backend("reference"), torch.no_grad():
                    compiled_step(net.layers, first_ref, states, spare_ref, shapes, prep_ref, None, gain)
            t0 = time.time()
            run_compiled()
            sync()
            out["compile_seconds"] = round(time.time() - t0, 1)
            record("torch.compile (explicit step)", "step_s", run_compiled, reps)
        except Exception as e:  # noqa: BLE001
            out.setdefault("path_errors", {})["torch.compile/step_s"] = f"{type(e).__name__}: {str(e)[:800]}"
            log(f"   torch.compile step: FAILED {type(e).__name__}: {str(e)[:300]}")
            compiled_step = None

    for backend in backends:
        run_b, *_ = eager_step_fn(backend)
        record(f"ours: {backend}", "step_s", run_b, reps)
        if dev.type == "cuda":
            # a captured chunk of 10 steps, replayed: per-step time
            def graph_chunk(backend=backend):
                from ep_kernels.engine import Plan
                plan = Plan(net.layers, x.shape, x.dtype, x.device)
                bufs, _ = plan.buffers(n)
                with use_backend(backend), torch.no_grad():
                    prepared = prepare_layers(net.layers)
                    first = net.layers[0].drive(x, prepared[0])
                    runner = cuda_graphs._PhaseRunner(net.layers, plan, n, gain, shapes, prepared, first, capture=True)
                    runner.load(prepared, first)
                    for b_, s_ in zip(bufs, states):
                        b_.copy_(s_)
                    runner.chunk(10)  # capture
                return lambda: runner.graphs[10][0].replay()
            try:
                replay = graph_chunk()
                if time.time() < budget_end:
                    t = timeit(replay, reps, warmup=1) / 10
                    out["paths"].setdefault(f"ours: {backend} + CUDA graphs", {})["step_s"] = t
                    log(f"   ours: {backend} + CUDA graphs step_s: {t * 1e3:.3f} ms")
            except Exception as e:  # noqa: BLE001
                out.setdefault("path_errors", {})[f"{backend}+graphs/step_s"] = f"{type(e).__name__}: {str(e)[:800]}"
                log(f"   {backend} + graphs step: FAILED {type(e).__name__}: {str(e)[:300]}")

    # -- one full ep_backward (T1 + 2 T2 steps: the nudged phases as one batch of 2N)
    def ep_run(backend, graphs=False, capture=True):
        def run():
            with use_backend(backend), cuda_graphs.use_cuda_graphs(graphs, capture=capture):
                net.zero_grad(set_to_none=True)
                net.ep_backward(x, y, beta=0.5, T1=T1, T2=T2)
        return run

    ep_reps = 1 if DRY else args.ep_reps
    record("autograd-phi (ep_reference)", "ep_backward_s",
           lambda: ep_reference.ep_gradient(ref, x, y, 0.5, T1, T2), 1)
    record("explicit (reference backend)", "ep_backward_s", ep_run("reference"), ep_reps)
    if compiled_step is not None:
        # the chunked runner (no capture) with its step compiled: the explicit path under torch.compile
        real_step = cuda_graphs.step
        cuda_graphs.step = compiled_step
        try:
            record("torch.compile (explicit step)", "ep_backward_s", ep_run("reference", True, capture=False), ep_reps)
        finally:
            cuda_graphs.step = real_step
    for backend in backends:
        record(f"ours: {backend}", "ep_backward_s", ep_run(backend), ep_reps)
        if dev.type == "cuda":
            record(f"ours: {backend} + CUDA graphs", "ep_backward_s", ep_run(backend, True), ep_reps)
    # derived: speed-ups against the autograd-of-Phi reference, effective rate
    base = out["paths"].get("autograd-phi (ep_reference)", {})
    peak = rates.get("tf32")
    for path, v in out["paths"].items():
        for key in ("step_s", "ep_backward_s"):
            if v.get(key) and base.get(key):
                v[key.replace("_s", "_speedup")] = base[key] / v[key]
        if v.get("step_s"):
            v["effective_tflops"] = flops / v["step_s"] / 1e12
            if peak:
                v["fraction_of_tf32_matmul_rate"] = flops / v["step_s"] / peak
    return out


# --------------------------------------------------------------------------------------------

def table(report):
    lines = []
    t = report["sections"].get("timing")
    if t:
        lines.append(f"VGG-5, batch {t['batch']}, float32; ep_backward: T1={t['T1']}, T2={t['T2']}, symmetric "
                     f"({t['gflop_per_step_dense']:.1f} GFLOP per dense step)")
        if t.get("matrix_rate_tflops"):
            lines.append("measured matmul rate: " + ", ".join(f"{k} {v:.0f} TFLOP/s"
                                                             for k, v in t["matrix_rate_tflops"].items()))
        hdr = f"{'path':<34}{'step ms':>10}{'x faster':>10}{'TFLOP/s':>10}{'of TF32':>9}{'ep_backward s':>15}{'x faster':>10}"
        lines += [hdr, "-" * len(hdr)]

        def f(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        for path, v in t["paths"].items():
            lines.append(f"{path:<34}{f(v.get('step_s') and v['step_s'] * 1e3, '10.3f')}"
                         f"{f(v.get('step_speedup'), '10.1f')}{f(v.get('effective_tflops'), '10.1f')}"
                         f"{f(v.get('fraction_of_tf32_matmul_rate') and 100 * v['fraction_of_tf32_matmul_rate'], '8.1f') + '%' if v.get('fraction_of_tf32_matmul_rate') else '        -'}"
                         f"{f(v.get('ep_backward_s'), '15.3f')}{f(v.get('ep_backward_speedup'), '10.1f')}")
    o = report["sections"].get("ops")
    if o:
        lines.append(f"ops vs reference: backends {o['backends']}: {'all ok' if o['all_ok'] else 'FAILURES'} "
                     f"{o['failures'] if o['failures'] else ''}")
    gc = report["sections"].get("gradcheck")
    if gc:
        lines.append("ep-gradcheck (EP vs BPTT, min cosine over parameters; float64 unless named): "
                     + ", ".join(f"{b} {v['min_cosine']:.6f}" for b, v in gc.items()))
    gr = report["sections"].get("graphs")
    if gr:
        lines.append("CUDA graphs vs eager (max |state diff|, max rel grad diff): "
                     + ", ".join(f"{b} {v['graphs']['states_max_abs_diff']:.1e}/{v['graphs']['grads_max_rel_diff']:.1e}"
                                 for b, v in gr.items()))
    if report["errors"]:
        lines.append("section errors: " + ", ".join(report["errors"]))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="ep_kernels' prepared GPU check")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the JSON")
    p.add_argument("--build-log", default=None)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--T1", type=int, default=250)
    p.add_argument("--T2", type=int, default=25)
    p.add_argument("--reps", type=int, default=10, help="repetitions of a step timing")
    p.add_argument("--ep-reps", type=int, default=2, help="repetitions of an ep_backward timing")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    p.add_argument("--time-budget", type=float, default=200.0,
                   help="seconds after which remaining timings are skipped (the script must end in time)")
    p.add_argument("--only", default="env,ops,gradcheck,graphs,timing")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU (Triton interpreted): checks the script")
    args = p.parse_args(argv)
    if args.cpu_dry_run:  # take the engine's CUDA-graph hook on CPU too (the runner then runs eagerly)
        from ep_kernels import cuda_graphs
        cuda_graphs.active_for = lambda x: cuda_graphs.enabled()
    global OUT_DIR
    OUT_DIR = args.out
    REPORT["args"] = vars(args)
    dev = torch.device("cpu" if args.cpu_dry_run else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        REPORT["errors"]["device"] = "no CUDA device"
        print("gpu_check: no CUDA device (use --cpu-dry-run to check the script on CPU)")
    else:
        from ep_kernels import _backend

        backends = [b for b in ("triton", "cuda") if (b == "triton" and _backend.triton_installed())
                    or (b == "cuda" and dev.type == "cuda" and _backend.cuda_kernels_available())]
        only = set(args.only.split(","))
        if "env" in only:
            run_section("env", sec_env, args, dev)
        if "ops" in only:
            run_section("ops", sec_ops, args, dev)
        if "gradcheck" in only:
            run_section("gradcheck", sec_gradcheck, args, dev, backends)
        if "graphs" in only:
            run_section("graphs", sec_graphs, args, dev, backends)
        if "timing" in only:
            run_section("timing", sec_timing, args, dev, backends)
    REPORT["total_seconds"] = round(time.time() - T_START, 1)
    text = table(REPORT)
    print("\n" + text)
    REPORT["table"] = text
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"gpu_check-{stamp}.json", "gpu_check-latest.json"):
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(REPORT, f, indent=1, default=str)
    print(f"\ngpu_check: wrote {os.path.join(args.out, 'gpu_check-latest.json')} ({REPORT['total_seconds']} s)")
    return 0 if not REPORT["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
