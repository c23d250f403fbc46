"""Compile every Triton kernel variant for a GPU target on a machine without a GPU.

The op wrappers run on CPU tensors under ``record_launches`` (nothing executes), and each
recorded launch is compiled by Triton's own compiler, through PTX to a cubin, for the target
(default: sm_90, the H200). This catches what the interpreter cannot: type errors of
``tl.dot`` operands, unsupported operations, register-hungry tiles that fail to compile.

Run: ``python -m ep_kernels.triton.compile_check`` with ``TRITON_INTERPRET`` unset.
"""
import argparse
import sys
import time

import torch


def _sig_type(v):
    if isinstance(v, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
                      torch.int64: "i64", torch.int32: "i32"}[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i64" if abs(v) >= 2 ** 31 else "i32"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {v!r}")


# Shared memory one block may use (bytes), by compute capability x 10.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def compile_launch(kernel, args, consts, target):
    """Compile one recorded launch; returns the compiled kernel."""
    import triton
    from triton.compiler import ASTSource

    names = [p.name for p in kernel.params]
    const_names = {p.name for p in kernel.params if p.is_constexpr}
    opts = {k: consts[k] for k in ("num_warps", "num_stages") if k in consts}
    values = dict(zip([n for n in names if n not in const_names], args))
    values.update({k: v for k, v in consts.items() if k in const_names})
    signature, constexprs = {}, {}
    for n in names:
        if n in const_names:
            signature[n] = "constexpr"
            constexprs[(names.index(n),)] = values[n]
        else:
            signature[n] = _sig_type(values[n])
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=target, options=opts)


def _representative_calls(dtype):
    """One call of each op per case that selects a different kernel variant."""
    from . import contrastive_conv_grad, conv_pool_drive, pool_argmax, pool_conv_transpose, state_update

    g = torch.Generator().manual_seed(0)
    d = torch.rand(2, 3, 4, 5, generator=g).to(dtype)
    for td, nu, pr in ((d, d, d), (None, None, d), (d, None, None)):
        state_update(d, td, nu, pr, 0.5, torch.empty_like(d))
    for pool in (1, 2, 3):
        x = torch.rand(2, 4, 9, 9, generator=g).to(dtype)
        w = torch.rand(6, 4, 3, 3, generator=g).to(dtype)
        b = torch.rand(6, generator=g).to(dtype)
        hc = 9
        s = torch.rand(2, 6, hc // pool, hc // pool, generator=g).to(dtype)
        idx = torch.zeros(s.shape, dtype=torch.int64)
        if pool > 1:
            pool_argmax(torch.rand(2, 6, hc, hc).to(dtype), b, pool)
            pool_argmax(torch.rand(2, 6, hc, hc).to(dtype), None, pool)
        pool_conv_transpose(s, idx, w, [9, 9], [hc, hc], [1, 1], [1, 1], [1, 1], 1, pool)
        gw = torch.zeros_like(w)
        contrastive_conv_grad(x, s, idx, x, s, idx, [hc, hc], [1, 1], [1, 1], [1, 1], 1, pool, -0.5, gw, None)
        contrastive_conv_grad(x, s, idx, x.clone(), s, idx, [hc, hc], [1, 1], [1, 1], [1, 1], 1, pool, -0.5, gw, None)
    conv_pool_drive  # (its kernel is pool_argmax's)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    p.add_argument("--dtypes", default="float32,float64,bfloat16")
    args = p.parse_args(argv)
    from . import INTERPRETED, record_launches

    if INTERPRETED:
        sys.exit("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", args.arch, 32)
    seen, failures = set(), []
    t0 = time.time()
    for name in args.dtypes.split(","):
        with record_launches() as rec:
            _representative_calls(getattr(torch, name))
        for kernel, _grid, kargs, consts in rec:
            key = (kernel.fn.__name__, tuple(_sig_type(a) for a in kargs),
                   tuple(sorted((k, str(v)) for k, v in consts.items())))
            if key in seen:
                continue
            seen.add(key)
            try:
                ck = compile_launch(kernel, kargs, consts, target)
                limit = SHARED_LIMIT.get(args.arch)
                if limit is not None and ck.metadata.shared > limit:
                    raise RuntimeError(f"needs {ck.metadata.shared} B of shared memory, more than the {limit} B "
                                       f"a block may use on sm_{args.arch}")
                print(f"ok   {kernel.fn.__name__:<32} {name:<9} {ck.metadata.num_warps} warps, "
                      f"{ck.metadata.shared} B shared, consts "
                      f"{ {k: v for k, v in consts.items() if k not in ('COMPUTE',)} }")
            except Exception as e:  # report every failure, then fail
                failures.append((kernel.fn.__name__, name, e))
                print(f"FAIL {kernel.fn.__name__:<32} {name:<9} {type(e).__name__}: {str(e)[:2000]}")
    print(f"{len(seen)} kernel variants compiled for sm_{args.arch} in {time.time() - t0:.1f}s, "
          f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
