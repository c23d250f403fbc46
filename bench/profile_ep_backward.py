"""Where the time of one early-stopped ep_backward goes (issue 13): torch.profiler over one
call of VGG-5 on 32 real CIFAR images (the time-to-gradient benchmark's setting), the ops
grouped by name, self CPU time, sorted. Prints a table and writes it as JSON.

    python bench/profile_ep_backward.py [--weights init|x2] [--schedule synchronous|alternating]
        [--tol 1e-4] [--threads N] [--out bench/results/profile.json]
"""
import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from ep_kernels import testing, use_backend  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", choices=["init", "x2"], default="init")
    p.add_argument("--schedule", choices=["synchronous", "alternating"], default="synchronous")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=os.path.join(HERE, "results", "profile.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net = testing.vgg5(seed=0)
    if args.weights == "x2":
        with torch.no_grad():
            for layer in net.layers:
                layer.weight.mul_(2)
                layer.bias.mul_(2)
    net.schedule = args.schedule
    data = torch.load(os.path.join(HERE, "data", "cifar_samples.pt"), weights_only=True)
    x, y = data["x"][:args.batch], data["y"][:args.batch]
    kw = dict(beta=1.0, T1=1500, T2=1000, tol=args.tol)
    with use_backend("cpu"):
        net.ep_backward(x, y, beta=1.0, T1=3, T2=2)  # warm-up: plans, packings, allocator
        net.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            res = net.ep_backward(x, y, **kw)
        wall = time.perf_counter() - t0
    d = res.diagnostics
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [{"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
             "share": e.self_cpu_time_total / total} for e in events[:args.top]]
    print(f"VGG-5, batch {args.batch}, weights {args.weights}, {args.schedule}, tol {args.tol:g}: "
          f"{wall:.2f} s wall (profiled), free {d['free']['steps']} steps, nudged {d['nudged']['steps']} steps")
    print(f"{'op':<48}{'calls':>8}{'self s':>10}{'share':>8}")
    for r in rows:
        print(f"{r['op'][:47]:<48}{r['calls']:>8}{r['self_cpu_s']:>10.3f}{100 * r['share']:>7.1f}%")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "wall_s": wall, "free_steps": d["free"]["steps"],
                   "nudged_steps": d["nudged"]["steps"], "ops": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
