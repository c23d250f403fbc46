"""Drop-in EP synapses. Each is the ``nn`` layer it replaces (same arguments, parameter
names and shapes, so state dicts move both ways) plus the three things relaxation needs:

- ``drive(s_prev)``: the bottom-up term ``a_l(s_{l-1})`` and the pooling argmax;
- ``top_down(s, indices, prev_shape)``: ``d<s_l, a_l(s_{l-1})>/ds_{l-1}`` with the argmax fixed;
- ``accumulate_contrastive_grad(...)``: ``scale * (dPhi/dtheta(a) - dPhi/dtheta(b))`` into ``.grad``.

They stay thin: the arithmetic is in ``ep_kernels.ops``, the algorithm in ``ep_kernels.engine``.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops



class Prepared(NamedTuple):
    """A synapse's parameters as relaxation uses them, made once per call (weights are fixed
    while the states relax): detached, and cast to the compute dtype if one is given."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    compute_dtype: Optional[torch.dtype]


def _cast(t, dtype):
    return t if dtype is None or t is None else t.to(dtype)


def _grad_buffer(p):
    """``p.grad``, created on first use (accumulate like autograd); None for a frozen
    parameter (``requires_grad=False``), whose gradient autograd would not fill either."""
    if p is None or not p.requires_grad:
        return None
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


class EPConv2d(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional ``pool`` x ``pool`` max-pool of stride ``pool``.

    Takes every ``nn.Conv2d`` argument; ``padding_mode`` must be ``'zeros'`` (the transposed
    convolution of the top-down signal assumes zero padding).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, pool=1):
        if padding_mode != "zeros":
            raise ValueError(f"EPConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"pool must be a positive int (1 = no pooling), got {pool!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.pool = pool

    def extra_repr(self):
        return super().extra_repr() + (f", pool={self.pool}" if self.pool > 1 else "")

    def _padding_pair(self):
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return [0, 0]
            # 'same' with stride 1 (nn.Conv2d enforces that); odd kernels only, since the
            # transposed convolution cannot express the asymmetric padding of even ones.
            if any(k % 2 == 0 for k in self.kernel_size):
                raise ValueError("EPConv2d: padding='same' needs odd kernel sizes")
            return [d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation)]
        return list(self.padding)

    def conv_args(self):
        return dict(stride=list(self.stride), padding=self._padding_pair(), dilation=list(self.dilation),
                    groups=self.groups)

    def conv_out_size(self, hw):
        return ops.conv_out_size(hw, self.kernel_size, self.stride, self._padding_pair(), self.dilation)

    def state_shape(self, in_shape):
        """(C_out, H, W) of this layer's state for an input state of shape ``in_shape``."""
        if len(in_shape) != 3:
            raise ValueError(f"EPConv2d needs a (C, H, W) input state, got shape {tuple(in_shape)}")
        if in_shape[0] != self.in_channels:
            raise ValueError(f"EPConv2d expects {self.in_channels} input channels, got {in_shape[0]}")
        h, w = self.conv_out_size(in_shape[1:])
        if h < self.pool or w < self.pool:
            raise ValueError(f"EPConv2d: input {tuple(in_shape)} gives a {h}x{w} convolution output, "
                             f"too small for pool={self.pool}")
        return (self.out_channels, h // self.pool, w // self.pool)

    def prepare(self, compute_dtype=None):
        """Weights for relaxation: detached, optionally cast to ``compute_dtype`` (e.g.
        bfloat16, with float32 states)."""
        return Prepared(_cast(self.weight.detach(), compute_dtype),
                        _cast(None if self.bias is None else self.bias.detach(), compute_dtype), compute_dtype)

    def drive(self, s_prev, prep=None):
        if prep is None:
            return ops.conv_pool_drive(s_prev, self.weight, self.bias, pool=self.pool, **self.conv_args())
        d, idx = ops.conv_pool_drive(_cast(s_prev, prep.compute_dtype), prep.weight, prep.bias, pool=self.pool,
                                     **self.conv_args())
        return d.to(s_prev.dtype), idx

    def top_down(self, s, indices, prev_shape, prep=None):
        w = self.weight if prep is None else prep.weight
        out = ops.pool_conv_transpose(_cast(s, None if prep is None else prep.compute_dtype), indices, w,
                                      list(prev_shape[1:]), self.conv_out_size(prev_shape[1:]), pool=self.pool,
                                      **self.conv_args())
        return out.to(s.dtype)

    def accumulate_contrastive_grad(self, x_a, s_a, idx_a, x_b, s_b, idx_b, scale):
        gw, gb = _grad_buffer(self.weight), _grad_buffer(self.bias)
        if gw is None:  # a frozen weight: only the bias (a per-channel sum of the states) learns
            if gb is not None:
                gb.add_(s_a.sum((0, 2, 3)) - s_b.sum((0, 2, 3)), alpha=scale)
            return
        ops.contrastive_conv_grad(x_a, s_a, idx_a, x_b, s_b, idx_b, self.conv_out_size(x_a.shape[2:]),
                                  pool=self.pool, scale=scale, grad_weight=gw, grad_bias=gb, **self.conv_args())

    def forward(self, x):
        """The drive ``P(W * x + b)``: the feed-forward use of the same synapse."""
        y = super().forward(x)
        return F.max_pool2d(y, self.pool) if self.pool > 1 else y


class EPLinear(nn.Linear):
    """``nn.Linear`` as an EP synapse; its input state is flattened."""

    def state_shape(self, in_shape):
        n = math.prod(in_shape)
        if n != self.in_features:
            raise ValueError(f"EPLinear expects {self.in_features} input features, got a state of shape "
                             f"{tuple(in_shape)} ({n} features)")
        return (self.out_features,)

    def prepare(self, compute_dtype=None):
        return Prepared(_cast(self.weight.detach(), compute_dtype),
                        _cast(None if self.bias is None else self.bias.detach(), compute_dtype), compute_dtype)

    def drive(self, s_prev, prep=None):
        if prep is None:
            return F.linear(s_prev.flatten(1), self.weight, self.bias), None
        d = F.linear(_cast(s_prev.flatten(1), prep.compute_dtype), prep.weight, prep.bias)
        return d.to(s_prev.dtype), None

    def top_down(self, s, indices, prev_shape, prep=None):
        w = self.weight if prep is None else prep.weight
        out = _cast(s, None if prep is None else prep.compute_dtype) @ w
        return out.to(s.dtype).view(s.shape[0], *prev_shape)

    def accumulate_contrastive_grad(self, x_a, s_a, idx_a, x_b, s_b, idx_b, scale):
        gw, gb = _grad_buffer(self.weight), _grad_buffer(self.bias)
        if gw is not None:
            gw.addmm_(s_a.t(), x_a.flatten(1), alpha=scale)
            gw.addmm_(s_b.t(), x_b.flatten(1), alpha=-scale)
        if gb is not None:
            gb.add_(s_a.sum(0) - s_b.sum(0), alpha=scale)

    def forward(self, x):
        return super().forward(x.flatten(1))
