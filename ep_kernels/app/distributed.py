"""Data-parallel EP training with ``torch.distributed`` (``torchrun``), for ``ep-train``.

    torchrun --nproc_per_node=4 -m ep_kernels.app.train --preset vgg5 --dataset cifar10 ...

Why it is exact. ``EPNetwork.ep_backward`` writes the batch-mean EP gradient, and every
example relaxes independently of the others. So N processes with a global batch of B do what
one process with batch B does: every rank draws the same permutation and augmentation from the
same seeded generator (the whole global batch, then keeps its contiguous slice of it), relaxes
its slice, and the slice-mean gradients are summed with weights ``n_rank / B``. The only
difference is the order of the float additions in the batch mean (a few float32 ulps per
step, see tests/test_distributed.py). Random-sign nudging draws its sign from torch's global
generator, which is seeded and consumed identically on every rank (a rank whose slice is empty,
at a short last batch, relaxes one dummy example with weight 0 so that it draws too).

What is communicated per optimizer step: the gradient (in buckets of ~25 MB, each all-reduced
asynchronously as soon as it is filled, all awaited before ``optimizer.step()``), one small
vector of metrics (loss, logits, diagnostics), and two stop flags (Ctrl-C, --max-minutes) so
that every rank stops after the same minibatch.

Without torchrun's environment (``WORLD_SIZE`` unset) nothing here is active and ``ep-train``
runs as a single process, unchanged.
"""
import contextlib
import datetime
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20
BUCKET_ENV = "EP_KERNELS_BUCKET_MB"       # override the bucket size (MB; tests use tiny buckets)
FAIL_ENV = "EP_KERNELS_FAIL_AT_STEP"      # test hook: raise at this (1-based) step of this session
FAIL_RANK_ENV = "EP_KERNELS_FAIL_RANK"    # ... on this rank (default 1)

_CURRENT = None  # the active Context, or None (single process)
_USED = False     # this process joined (and left) a process group


def launched_by_torchrun():
    """True when torchrun (or another env:// launcher) set this process's rank environment."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def current():
    """The active :class:`Context` (a data-parallel ``ep-train`` run), or None."""
    return _CURRENT


def is_writer():
    """True on the process that writes files and shows progress: rank 0, or a single process."""
    return _CURRENT is None or _CURRENT.rank == 0


def default_backend(device):
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def shard_bounds(n, rank, world):
    """Contiguous slice [lo, hi) of ``n`` items for ``rank``: sizes differ by at most one."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


# --- gradients -------------------------------------------------------------------------------

class GradientReducer:
    """Weighted sum of gradients over ranks: ``p.grad <- sum_r weight_r * p.grad_r``.

    Gradients are copied into flat buckets of about ``bucket_bytes`` (one dtype and device per
    bucket, parameters in reverse order as DDP does); each bucket's ``all_reduce`` is launched
    asynchronously as soon as it is filled, so filling the next bucket (and unpacking the
    previous one) overlaps the communication. :meth:`finish` waits for all of them.
    A missing ``.grad`` counts as zeros (and is created), so every rank sends the same layout.
    """

    def __init__(self, params, bucket_bytes=BUCKET_BYTES, group=None):
        self.group = group
        params = [p for p in params if p.requires_grad]
        self.buckets = []  # (params, flat buffer)
        cur, size, key = [], 0, None
        for p in reversed(params):
            k = (p.dtype, p.device)
            nb = p.numel() * p.element_size()
            if cur and (k != key or size + nb > bucket_bytes):
                self._add(cur)
                cur, size = [], 0
            cur.append(p)
            size += nb
            key = k
        if cur:
            self._add(cur)
        self.last_seconds = 0.0  # wall time of the last start() + finish() (communication)

    def _add(self, ps):
        buf = torch.empty(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
        self.buckets.append((ps, buf))

    def start(self, weight=1.0):
        """Fill and launch every bucket; returns the pending works (give them to :meth:`finish`)."""
        self._t0 = time.perf_counter()
        works = []
        for ps, buf in self.buckets:
            off = 0
            for p in ps:
                view = buf[off:off + p.numel()]
                if p.grad is None or weight == 0:
                    view.zero_()
                else:
                    view.copy_(p.grad.reshape(-1))
                off += p.numel()
            if weight not in (0, 1):
                buf.mul_(weight)
            works.append(dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
        return works

    def finish(self, works):
        """Wait for the buckets in order and write the sums back into ``.grad``."""
        for (ps, buf), w in zip(self.buckets, works):
            w.wait()
            off = 0
            for p in ps:
                view = buf[off:off + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
                off += p.numel()
        self.last_seconds = time.perf_counter() - self._t0

    def all_reduce(self, weight=1.0):
        self.finish(self.start(weight))


# --- nested diagnostics <-> flat numbers -----------------------------------------------------

def _leaves(d, out):
    """Numeric leaves of a nested dict/list, in a fixed order (the same on every rank)."""
    if isinstance(d, dict):
        for k in d:
            _leaves(d[k], out)
    elif isinstance(d, (list, tuple)):
        for v in d:
            _leaves(v, out)
    elif isinstance(d, torch.Tensor) and d.numel() == 1:
        out.append(float(d))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out.append(float(d))
    return out


def _rebuild(d, it):
    if isinstance(d, dict):
        return {k: _rebuild(v, it) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return type(d)(_rebuild(v, it) for v in d)
    if (isinstance(d, torch.Tensor) and d.numel() == 1) or (isinstance(d, (int, float)) and not isinstance(d, bool)):
        return next(it)
    return d


# --- the run ---------------------------------------------------------------------------------

class Context:
    """One data-parallel ``ep-train`` process: rank, world size, device, communication."""

    def __init__(self, rank, world_size, local_rank, backend, device):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend = backend
        self.device = device  # this rank's compute device
        # Small collectives (flags, metrics) on the backend's device.
        self.comm_device = device if backend == "nccl" else torch.device("cpu")
        self.steps = 0  # optimizer steps taken in this session (for the failure test hook)
        self._reducers = {}
        self.comm_seconds = 0.0  # total wall time spent in the gradient all-reduce this session
        fail = os.environ.get(FAIL_ENV)
        self._fail_at = int(fail) if fail else None
        self._fail_rank = int(os.environ.get(FAIL_RANK_ENV, "1"))

    def local_device(self, device):
        """This rank's device: ``cuda`` without an index becomes ``cuda:LOCAL_RANK``."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
        return device

    def reducer(self, net):
        params = [p for p in net.parameters() if p.requires_grad]
        key = tuple(id(p) for p in params)
        if key not in self._reducers:
            mb = os.environ.get(BUCKET_ENV)
            self._reducers = {key: GradientReducer(params, float(mb) * 2**20 if mb else BUCKET_BYTES)}
        return self._reducers[key]

    def shard(self, n):
        return shard_bounds(n, self.rank, self.world_size)

    def wrap_step(self, step, net):
        """``step(x, y) -> result`` on the global batch -> the same on this rank's slice, with
        the gradients and metrics reduced over ranks: afterwards ``.grad`` holds the global
        batch-mean gradient on every rank, and the result's loss, logits (of the whole global
        batch, in order) and diagnostics are the global ones (diagnostics: slice-size
        weighted means)."""

        def dp_step(x, y):
            self.steps += 1
            if self._fail_at is not None and self.steps == self._fail_at and self.rank == self._fail_rank:
                raise RuntimeError(f"{FAIL_ENV}={self._fail_at}: rank {self.rank} fails on purpose (test hook)")
            n_all = x.shape[0]
            lo, hi = self.shard(n_all)
            n = hi - lo
            if n > 0:
                res = step(x[lo:hi], y[lo:hi])
            else:  # empty slice (last batch smaller than the world): relax a dummy, weight 0
                res = step(x[:1], y[:1])
            w = n / n_all
            reducer = self.reducer(net)
            works = reducer.start(w)
            # Metrics in one vector: loss, numeric diagnostics (both weighted), the logits of
            # the global batch (this rank's rows; zeros elsewhere: the sum is exact).
            diag = getattr(res, "diagnostics", None) or {}
            leaves = _leaves(diag, [])
            logits = res.logits.detach()
            n_cls = logits.shape[1]
            vec = torch.zeros(1 + len(leaves) + n_all * n_cls, dtype=torch.float64, device=self.comm_device)
            if n > 0:
                head = torch.tensor([float(res.loss)] + leaves, dtype=torch.float64) * w
                vec[:1 + len(leaves)] = head.to(self.comm_device)
                off = 1 + len(leaves)
                vec[off + lo * n_cls:off + hi * n_cls] = logits.reshape(-1).to(self.comm_device, torch.float64)
            mwork = dist.all_reduce(vec, op=dist.ReduceOp.SUM, async_op=True)
            reducer.finish(works)
            self.comm_seconds += reducer.last_seconds
            mwork.wait()
            vals = vec.cpu().tolist()
            off = 1 + len(leaves)
            g_logits = torch.tensor(vals[off:], dtype=logits.dtype).view(n_all, n_cls).to(logits.device)
            g_diag = _rebuild(diag, iter(vals[1:off]))
            return SimpleNamespace(loss=torch.tensor(vals[0], dtype=res.loss.dtype), logits=g_logits,
                                   diagnostics=g_diag, states=None)

        return dp_step

    def stop_reason(self, interrupt, out_of_time):
        """Agree on stopping: if any rank saw Ctrl-C (or ran out of time), all stop here."""
        t = torch.tensor([int(bool(interrupt)), int(bool(out_of_time))], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        interrupt, out_of_time = (bool(v) for v in t.tolist())
        return "interrupt" if interrupt else "time" if out_of_time else None

    def evaluate(self, evaluate_fn, net, x, y, T1, device, **kw):
        """``evaluate_fn`` (mean loss, accuracy) on this rank's slice of the test set, reduced."""
        n_all = x.shape[0]
        lo, hi = self.shard(n_all)
        n = hi - lo
        loss, acc = evaluate_fn(net, x[lo:hi], y[lo:hi], T1, device, **kw) if n > 0 else (0.0, 0.0)
        t = torch.tensor([loss * n, round(acc * n)], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        loss_sum, correct = t.tolist()
        return loss_sum / n_all, int(round(correct)) / n_all

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.comm_device if self.backend == "nccl" else None)
        return box[0]


def stop_reason(interrupt, out_of_time):
    """The trainer's stop decision: local on one process, agreed over ranks otherwise."""
    if _CURRENT is not None:
        return _CURRENT.stop_reason(interrupt, out_of_time)
    return "interrupt" if interrupt else "time" if out_of_time else None


def local_device(device):
    return device if _CURRENT is None else _CURRENT.local_device(device)


class _QuietStream:
    """stderr of ranks other than 0: drops ep-train's own informational messages (rank 0
    prints them), passes everything else (tracebacks, warnings, errors) through."""

    def __init__(self, stream):
        self._s = stream
        self._drop = False
        self._at_start = True

    def write(self, s):
        if not s:
            return 0
        if self._at_start and s.startswith("ep-train: ") and not s.startswith("ep-train: error"):
            self._drop = True
        if not self._drop:
            self._s.write(s)
        if s.endswith("\n"):
            self._drop = False
        self._at_start = s.endswith("\n")
        return len(s)

    def flush(self):
        self._s.flush()

    def __getattr__(self, name):
        return getattr(self._s, name)


@contextlib.contextmanager
def session(cfg, run_dir, backend=None, timeout=None):
    """Joins the process group when launched by torchrun (else does nothing) and yields
    ``(cfg, run_dir)``, rank 0's (a new run's default folder name holds the time, so ranks
    could disagree). The group is destroyed on the way out, whatever happens."""
    global _CURRENT
    if not launched_by_torchrun():
        yield cfg, run_dir
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or default_backend(cfg["device"])
    ctx = Context(rank, world, local_rank, backend, None)
    device = ctx.local_device(cfg["device"])
    ctx.device = device
    ctx.comm_device = device if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kw = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    if backend == "nccl":
        kw["device_id"] = device
    dist.init_process_group(backend=backend, rank=rank, world_size=world, **kw)
    global _USED
    _USED = True
    old_out, old_err = sys.stdout, sys.stderr
    try:
        # Every rank has resolved its options (and read a checkpoint) before rank 0 writes.
        dist.barrier()
        cfg, run_dir = ctx.broadcast_object((cfg, run_dir))
        _CURRENT = ctx
        if rank != 0:
            sys.stdout = open(os.devnull, "w")
            sys.stderr = _QuietStream(old_err)
        yield cfg, run_dir
        # A clean end: wait for every rank before tearing the group down (gloo can abort a
        # rank whose peer closed its sockets first).
        dist.barrier()
    finally:
        _CURRENT = None
        if sys.stdout is not old_out:
            sys.stdout.close()
        sys.stdout, sys.stderr = old_out, old_err
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def exit(code):
    """``sys.exit(code)``, except after a torchrun session: flush and ``os._exit(code)``.

    With torch 2.13 + gloo a worker sometimes aborts at interpreter teardown, after the run
    has finished and the group was destroyed ("terminate called without an active
    exception", no Python frame; about 1 run in 10 here), which torchrun reports as a failure
    of the whole job. Everything ep-train writes is fsync'd and closed by then."""
    if _USED:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    sys.exit(code)
