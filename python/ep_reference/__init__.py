"""ep_reference: an independent pure-PyTorch reference of Equilibrium Propagation.

The "proof" implementation of docs/design.md ("The energy and the dynamics", "The EP gradient"), written the way the published EP codes
(Laborieux et al. 2021) are: relaxation by autograd of the primitive function Phi,
EP gradients by autograd of Phi w.r.t. the parameters at fixed states, BPTT by autograd
through the steps. It shares no code with ``ep_kernels`` and imports only torch.

    ref = ReferenceNet.from_module(net)          # or ReferenceNet([dict(weight=..., ...)], ...)
    ep = ep_gradient(ref, x, y, beta, T1, T2)    # ep.grads: name -> tensor
    bp = bptt_gradient(ref, x, y, T1)
    cosine_and_relerr(ep.grads, bp.grads)        # name -> (cosine, relative error)

Intermediate error signals (docs/design.md, "How signals enter the cost and the nudges") are part of the cost C when the net has them
(``ReferenceNet(..., signals=[dict(kind=..., layer=..., weight=..., ...)])`` or read from
``net.signals``); distillation targets are passed as ``teacher={"features": {layer: t},
"logits": t}`` to ``ep_gradient``, ``bptt_gradient``, ``gdu_curves`` (and ``cost``, ``step``).
"""
from .dynamics import (cost, free_phase, init_states, logits, nudged_phase, output_cost, phi, relax,
                       residual, resolve_teacher, sigma, signal_loss, step, synapse)
from .gradients import (BPTTResult, EPResult, GDUCurves, bptt_gradient, cosine_and_relerr,
                        ep_gradient, gdu_curves, head_grads, phi_param_grads, readout_grads)
from .net import Layer, ReferenceNet, Signal

__all__ = [
    "ReferenceNet", "Layer", "Signal",
    "phi", "cost", "output_cost", "signal_loss", "resolve_teacher", "logits", "synapse", "sigma", "init_states", "step", "relax", "free_phase",
    "nudged_phase", "residual",
    "ep_gradient", "bptt_gradient", "gdu_curves", "phi_param_grads", "readout_grads", "head_grads",
    "cosine_and_relerr", "EPResult", "BPTTResult", "GDUCurves",
]
