"""Worker of bench/test_bench_distributed.py, run under torchrun (gloo, CPU, 1 thread a rank).

Times data-parallel optimizer steps of a preset network the way ``ep-train`` takes them
(this rank's slice of the global batch -> ep_backward -> bucketed all-reduce -> SGD step),
then the all-reduce of the same gradient alone, and of a full-width VGG-5's gradient.
Rank 0 writes a JSON file with the medians (the slowest rank per step).
"""
import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from ep_kernels.app.distributed import GradientReducer, shard_bounds
from ep_kernels.models import build_network


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset"), p.add_argument("--width", type=float), p.add_argument("--in-shape")
    p.add_argument("--batch", type=int), p.add_argument("--T1", type=int), p.add_argument("--T2", type=int)
    p.add_argument("--steps", type=int), p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    in_shape = tuple(int(v) for v in a.in_shape.split("x"))
    net = build_network(a.preset, in_shape, 10, width=a.width, T1=a.T1, T2=a.T2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(a.batch, *in_shape, generator=g), torch.randint(0, 10, (a.batch,), generator=g)
    lo, hi = shard_bounds(a.batch, rank, world)
    xs, ys, w = x[lo:hi], y[lo:hi], (hi - lo) / a.batch
    reducer = GradientReducer(list(net.parameters()))
    rows = []
    for k in range(a.steps + 1):  # the first is a warm-up
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        net.ep_backward(xs, ys)
        t1 = time.perf_counter()
        reducer.all_reduce(w)
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if k:
            rows.append([t3 - t0, t1 - t0, t2 - t1])
    t = torch.tensor(rows, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    comm_alone = []
    for _ in range(10):
        dist.barrier()
        t0 = time.perf_counter()
        reducer.all_reduce(1.0)
        comm_alone.append(time.perf_counter() - t0)
    big = torch.zeros(sum(p.numel() for p in build_network("vgg5", (3, 32, 32), 10).parameters()))
    big_t = []
    for _ in range(5):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(big)
        big_t.append(time.perf_counter() - t0)
    if rank == 0:
        med = lambda v: statistics.median(v)  # noqa: E731
        n_params = sum(p.numel() for p in net.parameters())
        with open(a.out, "w") as f:
            json.dump({"world": world, "params": n_params, "grad_MB": 4 * n_params / 2**20,
                       "step_s": med(t[:, 0].tolist()), "ep_backward_s": med(t[:, 1].tolist()),
                       "allreduce_in_step_s": med(t[:, 2].tolist()), "allreduce_alone_s": med(comm_alone),
                       "vgg5_full_grad_MB": 4 * big.numel() / 2**20, "vgg5_full_allreduce_s": med(big_t)}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import os
    import sys
    main()
    sys.stdout.flush()
    os._exit(0)  # see ep_kernels.app.distributed.exit: avoids a rare gloo abort at interpreter teardown
