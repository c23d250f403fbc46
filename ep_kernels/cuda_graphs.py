"""Whole relaxation phases as CUDA graphs (docs/design.md, "CUDA graphs").

A phase is hundreds of identical steps; on a GPU each step is dozens of small kernel launches,
and at batch 128 the launches cost more than the arithmetic. Here the steps between two
convergence checks are captured once as a CUDA graph and replayed:

- static buffers: the state buffers are the engine's ``Plan`` buffers (two sets, swapped every
  step; a chunk of an odd number of steps copies its result back, so every replay starts and
  ends in the same set), the first layer's constant drive, and for the nudged phases ``y``,
  the per-example ``beta`` and the teacher's targets: each phase copies its inputs into them;
- one graph per chunk length (``check_every`` steps, and the remainder of ``T``), captured on
  first use and kept on the ``Plan`` (so shapes, dtype and device are fixed); re-captured only
  when something the graph baked in changes: the parameters' storage (replaced, not updated
  in place: an optimizer's in-place step keeps the graph valid), the backend, the activation
  gain, the intermediate signals, the teacher's target shapes;
- on-device convergence test: the graph ends with each layer's max |s_t - s_{t-1}| (reduced
  on the device) in one small static tensor, which the host reads once per chunk, i.e. every
  ``check_every`` steps, never per step. Same rule as the eager loop (``relaxation.relax``): stop
  at the first check where every change is below ``tol``; a NaN raises ``RelaxationDiverged``.

So the graph path takes the same steps, in the same order, with the same kernels as the eager
path, and gives the same states (bitwise: a replay runs the captured kernels on the same
addresses). A step is the eager loop's own (``relaxation.STEPS``, either schedule); on CPU the
chunk logic runs without capture (``capture=False``), which is how the tests check it against
``relaxation.relax``.

Use: ``with ep_kernels.cuda_graphs.use_cuda_graphs(): net.ep_backward(x, y)`` (or
``EP_KERNELS_CUDA_GRAPHS=1``) with the network and data on a GPU; pair it with a GPU backend
(``use_backend('cuda')`` or ``'triton'``) or the ``reference`` backend. CPU tensors ignore it.
"""
import contextlib
import os

import torch

from ._backend import backend_for
from ._context import ThreadLocalStack
from .relaxation import STEPS, PhaseReport, check_residuals, make_nudge_fn, prepare_layers, start_states

_settings = ThreadLocalStack()  # (enabled, capture) of the enclosing use_cuda_graphs blocks, this thread


@contextlib.contextmanager
def use_cuda_graphs(enabled: bool = True, capture: bool = True):
    """Run relaxation phases on CUDA tensors as captured CUDA graphs inside the block.
    ``capture=False`` runs the same chunked runner without capturing (for debugging, or to
    wrap its step in another tool such as ``torch.compile``)."""
    with _settings.pushed((bool(enabled), bool(capture))):
        yield


def enabled() -> bool:
    """Whether phases on CUDA tensors use CUDA graphs: the innermost ``use_cuda_graphs``, else
    ``EP_KERNELS_CUDA_GRAPHS=1``."""
    top = _settings.top()
    if top is not None:
        return top[0]
    return os.environ.get("EP_KERNELS_CUDA_GRAPHS", "").strip() == "1"


def _capture_default(x):
    top = _settings.top()
    return x.is_cuda and (top[1] if top is not None else True)


def active_for(x) -> bool:
    return x.is_cuda and enabled()


def _static_like(t):
    return None if t is None else torch.empty_like(t)


def _copy_tree(dst, src):
    """Copy a nested dict/tensor structure ``src`` into the same-shaped static ``dst``."""
    if isinstance(src, torch.Tensor):
        dst.copy_(src)
    elif isinstance(src, dict):
        for k, v in src.items():
            _copy_tree(dst[k], v)


def _clone_tree(src):
    if isinstance(src, torch.Tensor):
        return torch.empty_like(src)
    if isinstance(src, dict):
        return {k: _clone_tree(v) for k, v in src.items()}
    return src


def _tree_key(src):
    if isinstance(src, torch.Tensor):
        return (tuple(src.shape), src.dtype, str(src.device))
    if isinstance(src, dict):
        return tuple(sorted((str(k), _tree_key(v)) for k, v in src.items()))
    return repr(src)


def _param_key(modules):
    """The storage of parameters a graph reads directly (the readout's and the signal heads',
    in the nudges): replaced parameters need a new capture, in-place updates do not."""
    ptrs = []
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            ptrs.append((p.data_ptr(), tuple(p.shape), p.dtype))
    return tuple(ptrs)


def _prepared_key(prepared):
    return tuple((type(p).__name__, tuple(_tree_key(t) for t in p)) for p in prepared)


def _static_prepared(prepared):
    """Static copies of the layers' prepared weights (detached or cast per call: new tensors
    each time), refreshed by ``_load_prepared`` before every phase."""
    return [p._replace(**{f: torch.empty_like(getattr(p, f)) for f in p._fields
                          if isinstance(getattr(p, f), torch.Tensor)}) for p in prepared]


def _load_prepared(static, prepared):
    for st, p in zip(static, prepared):
        for f in p._fields:
            v = getattr(p, f)
            if isinstance(v, torch.Tensor):
                getattr(st, f).copy_(v)


class _PhaseRunner:
    """The captured chunks of one kind of phase (free or nudged) for one batch of a Plan."""

    def __init__(self, layers, plan, batch, gain, shapes, prepared, first_drive, make_nudge=None, nudge_inputs=None,
                 capture=True, schedule="synchronous"):
        self.layers, self.gain, self.shapes = layers, gain, shapes
        self.step = STEPS[schedule]
        self.prepared = _static_prepared(prepared)
        self.bufs, self.spare = plan.buffers(batch)
        self.fd = (torch.empty_like(first_drive[0]), _static_like(first_drive[1]))
        self.nudge_inputs = None if nudge_inputs is None else _clone_tree(nudge_inputs)
        self.nudge_fn = None if make_nudge is None else make_nudge(self.nudge_inputs)
        self.capture = capture
        self.graphs = {}  # chunk length -> (graph, static residual)
        self.pool = None

    def load(self, prepared, first_drive, nudge_inputs=None):
        _load_prepared(self.prepared, prepared)
        self.fd[0].copy_(first_drive[0])
        if self.fd[1] is not None:
            self.fd[1].copy_(first_drive[1])
        if nudge_inputs is not None:
            _copy_tree(self.nudge_inputs, nudge_inputs)

    def _steps(self, c):
        """``c`` steps from ``bufs``, the result back in ``bufs``; the last step's changes."""
        cur, nxt = self.bufs, self.spare
        changes = None
        cache = {}  # per chunk: the alternating schedule recomputes its carried drives once per chunk
        for _ in range(c):
            changes = self.step(self.layers, self.fd, cur, nxt, self.shapes, self.prepared, self.nudge_fn, self.gain,
                                cache)
            cur, nxt = nxt, cur
        if cur is not self.bufs:
            for a, b in zip(self.bufs, cur):
                a.copy_(b)
        return torch.stack(changes)

    def _capture(self, c):
        # Warm up outside the capture (lazy initialisation: cuBLAS/cuDNN handles and algorithm
        # choice, Triton's compilation), on a side stream as torch.cuda.graph requires. One step
        # into the spare buffers: the states in bufs are not touched.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(self.layers, self.fd, self.bufs, self.spare, self.shapes, self.prepared, self.nudge_fn,
                          self.gain)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            resid = self._steps(c)
        return g, resid

    def chunk(self, c):
        """Run ``c`` steps (a replay once captured); returns the changes as a list of floats
        (the one host read per chunk)."""
        if not self.capture:
            return self._steps(c).tolist()
        if c not in self.graphs:
            self.graphs[c] = self._capture(c)
        g, resid = self.graphs[c]
        g.replay()
        return resid.tolist()

    def run(self, steps, tol, check_every, phase):
        L = len(self.layers)
        if steps <= 0:
            return self.bufs, PhaseReport(steps=0, residual=[0.0] * L, converged=False)
        done, res, converged = 0, [0.0] * L, False
        while done < steps:
            # the eager loop checks at every multiple of check_every and at the last step
            c = min(check_every - done % check_every, steps - done)
            res = self.chunk(c)
            done += c
            if check_residuals(res, phase, done, tol):
                converged = True
                break
        return self.bufs, PhaseReport(steps=done, residual=res, converged=converged)


def _runner(plan, kind, key, factory):
    """The runner of one kind of phase for ``key``; a phase run in two precisions (bfloat16,
    then the parameters' dtype: ``engine.Precision``) keeps one runner for each."""
    cache = plan.__dict__.setdefault("_cuda_graph_runners", {})
    runners = cache.setdefault(kind, {})
    if key not in runners:
        if len(runners) >= 4:  # keys that changed (replaced parameters, another backend): drop the oldest
            runners.pop(next(iter(runners)))
        runners[key] = factory()
    return runners[key]


def _backend_key(x):
    return backend_for(x.device)


def _phase_setup(layers, plan, x, gain, capture, schedule, prepared, first_drive):
    """What both phases' runners start from: the capture choice, the prepared weights, the
    first layer's drive, the input shapes of every synapse, and the part of the runner key
    that both phases share."""
    capture = _capture_default(x) if capture is None else capture
    if prepared is None:
        prepared = prepare_layers(layers)
    if first_drive is None:
        first_drive = layers[0].drive(x, prepared[0])
    shapes = [tuple(x.shape[1:])] + [tuple(s) for s in plan.state_shapes[:-1]]
    key = (x.shape[0], float(gain), _backend_key(x), capture, schedule, _prepared_key(prepared),
           _tree_key(first_drive))
    return capture, prepared, first_drive, shapes, key


def free_phase(layers, plan, x, T, gain, tol=None, check_every=10, first_drive=None, prepared=None, capture=None,
               schedule="synchronous", init=None):
    """``engine.free_phase`` with captured chunks (``capture=False``: the same chunks, run
    eagerly, e.g. on CPU)."""
    capture, prepared, first_drive, shapes, key = _phase_setup(layers, plan, x, gain, capture, schedule, prepared,
                                                               first_drive)
    n = x.shape[0]
    runner = _runner(plan, ("free", n), key,
                     lambda: _PhaseRunner(layers, plan, n, gain, shapes, prepared, first_drive, capture=capture,
                                          schedule=schedule))
    runner.load(prepared, first_drive)
    start_states(runner.bufs, init)
    return runner.run(T, tol, check_every, "free")


def nudged_phase(net, plan, x, y, teacher, s_star, betas, T, gain, tol=None, check_every=10, first_drive=None,
                 prepared=None, capture=None, schedule="synchronous"):
    """``engine.nudged_phase`` with captured chunks."""
    layers = net.layers
    capture, prepared, first_drive, shapes, key = _phase_setup(layers, plan, x, gain, capture, schedule, prepared,
                                                               first_drive)
    n = x.shape[0]
    inputs = {"y": y, "betas": betas, "teacher": teacher}
    key += (net.mode, _param_key([net.readout] + list(net.signals)), _tree_key(inputs),
            tuple(id(s) for s in net.signals))

    def make_nudge(static):
        return make_nudge_fn(net, static["y"], static["teacher"], static["betas"])

    runner = _runner(plan, ("nudged", n), key,
                     lambda: _PhaseRunner(layers, plan, n, gain, shapes, prepared, first_drive, make_nudge, inputs,
                                          capture=capture, schedule=schedule))
    runner.load(prepared, first_drive, inputs)
    for b, s in zip(runner.bufs, s_star):
        b.copy_(s)
    return runner.run(T, tol, check_every, "nudged")
