"""``EPNetwork``: a stack of EP synapses and a readout, trained by ``ep_backward``.

The module holds parameters and checks inputs; the algorithm is in ``ep_kernels.engine``.
"""
import math
import numbers
import threading
import warnings

import torch
import torch.nn as nn

from . import engine, relaxation
from .intermediate import IntermediateSignal
from .layers import EPConv2d, EPLinear


def _check_steps(name, v, allow_zero=False):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, got {v!r}")
    return int(v)


def _check_beta(beta):
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    return float(beta)


def _check_tol(tol):
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be None or a positive finite number, got {tol!r}")
    return float(tol)


# Below this many machine epsilons of the dtype, beta is warned about (see check_beta).
BETA_EPS_WARNING = 100


def check_beta(beta, dtype, batch=1):
    """Check a nudging strength for a network computing in ``dtype`` with ``batch`` examples.

    Refused (ValueError): beta that is not a positive finite number, or whose own value or
    contrastive scale ``1 / (2 beta batch)`` is not a normal number of ``dtype`` (overflow, or
    underflow to a denormal or zero): the nudge or the gradient would be inf, 0 or garbage.

    Warned (RuntimeWarning): beta < ``BETA_EPS_WARNING`` x the dtype's machine epsilon
    (float32: 1.2e-5, float64: 2.2e-14). The nudged states then differ from the free ones by
    at most about a hundred rounding steps of the states (which lie in [0, 1]), so rounding
    alone perturbs the EP estimate by about 1% or more, and by 100% near epsilon itself.
    """
    beta = _check_beta(beta)
    fi = torch.finfo(dtype)
    scale = 1.0 / (2.0 * beta * batch)
    if not (fi.tiny <= beta <= fi.max and fi.tiny <= scale <= fi.max):
        raise ValueError(f"beta={beta!r} is out of range for {dtype}: beta and 1/(2 beta N) (N={batch}) must both lie "
                         f"in [{fi.tiny:.3g}, {fi.max:.3g}]")
    if beta < BETA_EPS_WARNING * fi.eps:
        warnings.warn(f"beta={beta!r} is below {BETA_EPS_WARNING} x the machine epsilon of {dtype} "
                      f"({BETA_EPS_WARNING * fi.eps:.2g}): rounding of the states dominates the EP gradient estimate; "
                      "use a larger beta or float64", RuntimeWarning, stacklevel=3)
    return beta


def layer_signature(layers):
    """What the relaxation plan depends on: each layer's identity and geometry. A changed
    layer (replaced, or its padding or pool set anew) gives a new signature, hence a new plan."""
    sig = []
    for layer in layers:
        if isinstance(layer, EPConv2d):
            sig.append((id(layer), "conv", layer.in_channels, layer.out_channels, tuple(layer.kernel_size),
                        tuple(layer.stride), str(layer.padding), tuple(layer.dilation), layer.groups, layer.pool))
        else:
            sig.append((id(layer), "linear", layer.in_features, layer.out_features))
    return tuple(sig)


class EPNetwork(nn.Module):
    """A convergent recurrent network of EP synapses.

    ``EPNetwork(*layers, readout=nn.Linear(...))`` is cross-entropy mode (the readout reads
    ``flat(s_L)``); ``readout=None`` is MSE mode (``s_L`` is the output). ``activation`` is
    ``'hardsigmoid'`` (``clamp(x, 0, 1)``) or ``'hardsigmoid_half'`` (``clamp(x/2, 0, 1)``).
    ``T1``, ``T2``, ``beta``, ``nudging`` and ``tol`` are defaults for the calls below.
    ``schedule`` is how a relaxation step updates the layers: ``'synchronous'`` (all from the
    same old states, as in Laborieux et al.) or ``'alternating'`` (odd-numbered layers, then
    even-numbered ones: Phi never decreases, so deep or strongly coupled networks converge
    where synchronous updates oscillate; same fixed points, same cost per step).
    ``compute_dtype=torch.bfloat16`` runs the relaxation's convolutions and matrix products
    in bfloat16 with the states, state updates and weight updates in the parameters' dtype
    (measure what it does to the gradient with ``ep-gradcheck --compute-dtype bfloat16``).
    """

    def __init__(self, *layers, readout=None, activation="hardsigmoid_half", T1=30, T2=10, beta=0.5,
                 nudging="symmetric", tol=None, check_every=None, signals=(), compute_dtype=None,
                 schedule="synchronous"):
        super().__init__()
        if not layers:
            raise ValueError("EPNetwork needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, (EPConv2d, EPLinear)):
                raise TypeError(f"layer {i} must be EPConv2d or EPLinear, got {type(layer).__name__}")
        if readout is not None and not isinstance(readout, nn.Linear):
            raise TypeError(f"readout must be an nn.Linear or None, got {type(readout).__name__}")
        if activation not in relaxation.ACTIVATION_GAIN:
            raise ValueError(f"activation must be one of {sorted(relaxation.ACTIVATION_GAIN)}, got {activation!r}")
        if nudging not in relaxation.NUDGING:
            raise ValueError(f"nudging must be one of {relaxation.NUDGING}, got {nudging!r}")
        self.schedule = schedule
        self.layers = nn.ModuleList(layers)
        self.readout = readout
        for i, sig in enumerate(signals):
            if not isinstance(sig, IntermediateSignal):
                raise TypeError(f"signals[{i}] must be an IntermediateSignal, got {type(sig).__name__}")
            sig.state_index(len(layers))  # range check
            if sig.layer == "readout" and readout is None:
                raise ValueError("LogitDistillation(layer='readout') needs a readout (cross-entropy mode)")
        # Training-only terms of the cost (docs/design.md, "How signals enter the cost and the nudges"); empty for plain EP.
        self.signals = nn.ModuleList(signals)
        self.activation = activation
        self.T1, self.T2 = _check_steps("T1", T1), _check_steps("T2", T2)
        self.beta = _check_beta(beta)
        self.nudging = nudging
        self.tol = _check_tol(tol)
        # None: every step on CPU, every 10 on a GPU (relaxation.default_check_every)
        self.check_every = None if check_every is None else _check_steps("check_every", check_every)
        if compute_dtype is not None and compute_dtype not in (torch.bfloat16, torch.float16, torch.float32,
                                                               torch.float64):
            raise ValueError(f"compute_dtype must be None or a floating dtype such as torch.bfloat16, "
                             f"got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        self._plans = {}
        # Calls on one network share its state buffers and accumulate into the same .grad:
        # concurrent calls from several threads run one after the other (the serial results).
        self._call_lock = threading.RLock()

    def __getstate__(self):  # a lock cannot be pickled or deep-copied: a copy gets its own
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_call_lock", None)
        state["_plans"] = {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._call_lock = threading.RLock()

    @property
    def schedule(self):
        """How a relaxation step updates the layers: ``'synchronous'`` or ``'alternating'``."""
        return self._schedule

    @schedule.setter
    def schedule(self, value):
        if value not in relaxation.SCHEDULES:
            raise ValueError(f"schedule must be one of {relaxation.SCHEDULES}, got {value!r}")
        self._schedule = value

    @property
    def mode(self):
        return "ce" if self.readout is not None else "mse"

    @property
    def n_classes(self):
        if self.readout is not None:
            return self.readout.out_features
        last = self.layers[-1]
        return last.out_features if isinstance(last, EPLinear) else None

    def extra_repr(self):
        return (f"mode={self.mode}, activation={self.activation}, schedule={self.schedule}, T1={self.T1}, "
                f"T2={self.T2}, beta={self.beta}")

    # -- input checks ---------------------------------------------------------------------
    def _param(self):
        return next(self.parameters())

    def _check_x(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.is_nested or x.layout != torch.strided:
            raise TypeError(f"x must be a dense (strided) tensor, got {'a nested tensor' if x.is_nested else x.layout}")
        p = self._param()
        if x.device != p.device:
            raise ValueError(f"x is on {x.device} but the network's parameters are on {p.device}")
        if x.dtype != p.dtype:
            hint = f"x.to({p.dtype})" + (f" or net.to({x.dtype})" if x.is_floating_point() else "")
            raise TypeError(f"x has dtype {x.dtype} but the network's parameters are {p.dtype}; convert with {hint}")
        if isinstance(self.layers[0], EPConv2d) and x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W) for a first EPConv2d layer, got shape {tuple(x.shape)}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"x must be batch-first with at least one example, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")

    def _check_y(self, y, x):
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor of class indices, got {type(y).__name__}")
        if y.dtype != torch.int64:
            raise TypeError(f"y must hold int64 class indices, got dtype {y.dtype}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
        k = self.n_classes
        if k is None:
            raise ValueError("MSE mode needs a last EPLinear layer whose units are the classes")
        if y.numel() and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"y holds class indices outside [0, {k}): min {y.min().item()}, max {y.max().item()}")

    def _check_params(self):
        for name, p in self.named_parameters():
            if not torch.isfinite(p).all():
                raise ValueError(f"parameter {name} contains NaN or infinite values")

    def _check_readout(self, plan):
        """The readout reads the last state: check the sizes before relaxing, not after."""
        if self.readout is None:
            return
        feat = math.prod(plan.state_shapes[-1])
        if self.readout.in_features != feat:
            raise ValueError(f"the readout nn.Linear({self.readout.in_features}, {self.readout.out_features}) does not "
                             f"fit the last layer's state: layer {len(self.layers) - 1} gives shape "
                             f"{tuple(plan.state_shapes[-1])} = {feat} features per example")

    @staticmethod
    def _refuse_inference_mode(what):
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{what} fills .grad, which torch.inference_mode() does not allow; call it outside "
                               "inference_mode (it builds no autograd graph of its own)")

    def _check_every(self, x):
        return relaxation.default_check_every(x.device) if self.check_every is None else self.check_every

    def _check_init(self, init, x, plan):
        """Starting states for the free phase: one per layer, shaped like ``free_phase``'s output."""
        if init is None:
            return None
        if not isinstance(init, (list, tuple)) or len(init) != len(self.layers):
            got = f"{len(init)} of them" if isinstance(init, (list, tuple)) else type(init).__name__
            raise TypeError(f"init must be a list of {len(self.layers)} state tensors (as free_phase returns), "
                            f"got {got}")
        p = self._param()
        for i, (s, shape) in enumerate(zip(init, plan.state_shapes)):
            if not isinstance(s, torch.Tensor) or s.shape != (x.shape[0],) + tuple(shape):
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"init[{i}] must have shape {(x.shape[0],) + tuple(shape)}, got {got}")
            if s.dtype != p.dtype or s.device != p.device:
                raise TypeError(f"init[{i}] must be {p.dtype} on {p.device}, got {s.dtype} on {s.device}")
            if not torch.isfinite(s).all():
                raise ValueError(f"init[{i}] contains NaN or infinite values")
        return list(init)

    def plan_for(self, x):
        """The relaxation plan (state shapes and buffers) for inputs shaped like ``x``, cached
        per input shape, dtype, device, inference mode (its buffers are inference tensors) and
        layer geometry (replacing a layer, or changing its padding or pool, makes a new plan)."""
        p = self._param()
        key = (tuple(x.shape), p.dtype, p.device, torch.is_inference_mode_enabled(), layer_signature(self.layers))
        if key not in self._plans:
            if len(self._plans) > 8:  # a few shapes (train batch, last batch, eval) in practice
                self._plans.clear()
            plan = relaxation.Plan(self.layers, x.shape, p.dtype, p.device)
            self._check_readout(plan)
            self._plans[key] = plan
        return self._plans[key]

    # -- the three things users call ----------------------------------------------------
    def free_phase(self, x, T1=None, tol=None, init=None):
        """States at the end of the free phase (copies) and the phase report. ``init``: states
        to start from (a list like this returns; default zeros), e.g. to continue a phase."""
        self._check_x(x)
        self._check_params()
        T1 = self.T1 if T1 is None else _check_steps("T1", T1)
        tol = self.tol if tol is None else _check_tol(tol)
        with self._call_lock, torch.no_grad():
            plan = self.plan_for(x)
            init = self._check_init(init, x, plan)
            precision = engine.Precision(self.layers, x, self.compute_dtype, tol)
            states, rep = engine.relax_free(self, plan, x, T1, self._check_every(x), precision, init=init)
            return [s.clone() for s in states], rep

    def forward(self, x, T1=None):
        """Inference: the free phase, then the readout. Returns logits (MSE mode: s_L)."""
        states, _ = self.free_phase(x, T1)
        with torch.no_grad():
            if self.readout is not None:
                return self.readout(states[-1].flatten(1))
            return states[-1].flatten(1)

    def ep_backward(self, x, y, beta=None, T1=None, T2=None, nudging=None, tol=None, keep_states=False,
                    teacher=None, free_init=None):
        """Free and nudged phases; accumulates the EP gradient into the ``.grad`` of every
        parameter that requires grad (frozen ones are left alone).

        Returns an ``EPResult`` with the loss and logits at the free equilibrium and
        diagnostics: each phase's steps and per-layer residual (last max |s_t - s_{t-1}|),
        and the per-layer mean |s+ - s*|. ``keep_states=True`` also returns the states
        (``res.states["free" | "plus" | "minus"]``). ``teacher``: distillation targets, a dict
        ``{"features": {layer: tensor}, "logits": tensor}`` or a callable giving one for ``x``.
        ``beta`` is checked against the parameters' dtype (``check_beta``). ``free_init``:
        states to start the free phase from (default zeros).
        """
        self._refuse_inference_mode("ep_backward")
        self._check_x(x)
        self._check_y(y, x)
        self._check_params()
        beta = check_beta(self.beta if beta is None else beta, self._param().dtype, x.shape[0])
        T1 = self.T1 if T1 is None else _check_steps("T1", T1)
        T2 = self.T2 if T2 is None else _check_steps("T2", T2)
        tol = self.tol if tol is None else _check_tol(tol)
        nudging = self.nudging if nudging is None else nudging
        if nudging not in relaxation.NUDGING:
            raise ValueError(f"nudging must be one of {relaxation.NUDGING}, got {nudging!r}")
        with self._call_lock:
            if free_init is not None:
                free_init = self._check_init(free_init, x, self.plan_for(x))
            return engine.ep_backward(self, x, y, beta, T1, T2, nudging, tol, self._check_every(x), keep_states,
                                      teacher, free_init)

    def bptt_backward(self, x, y, T1=None, teacher=None):
        """Backpropagation through the T1 free steps; accumulates the exact gradient of the
        loss at s(T1) into every ``.grad`` (of parameters that require grad). Memory grows
        with T1."""
        self._refuse_inference_mode("bptt_backward")
        self._check_x(x)
        self._check_y(y, x)
        self._check_params()
        T1 = self.T1 if T1 is None else _check_steps("T1", T1)
        with self._call_lock:
            return engine.bptt(self, x, y, T1, teacher)
