"""The state update ``out = clamp(gain * (drive + top_down + nudge), 0, 1)``, fused.

``gain`` is 1 for the hard sigmoid ``clamp(x, 0, 1)`` and 0.5 for ``clamp(x/2, 0, 1)``.
``top_down`` and ``nudge`` may be None. Writes into ``out`` (preallocated, so relaxation
allocates nothing per step) and returns ``max |out - prev|`` as a 0-dim tensor (the change
used for convergence tests), or an empty tensor when ``prev`` is None. NaN propagates
(clamp(NaN) = NaN), so a diverging relaxation is detectable from the returned change.
"""
import torch

from ._common import check_no_grad, run
from ._meta import check_overlap, state_update_meta


def state_update_ref(drive, top_down, nudge, prev, gain, out):
    total = drive
    if top_down is not None:
        total = total + top_down
    if nudge is not None:
        total = total + nudge
    out.copy_(torch.clamp(total * gain, 0.0, 1.0))
    if prev is None:
        return torch.empty(0, dtype=out.dtype, device=out.device)
    return (out - prev).abs().max()


def state_update(drive, top_down, nudge, prev, gain, out):
    """``out = clamp(gain * (drive + top_down + nudge), 0, 1)`` and ``max |out - prev|``.

    Args:
        drive: any shape, floating point.
        top_down, nudge, prev: None or tensors of ``drive``'s shape, dtype and device.
        gain: a finite float.
        out: ``drive``'s shape, dtype and device; written in place. It may be ``drive``,
            ``top_down`` or ``nudge`` itself, but must not otherwise overlap them, nor ``prev``.

    Returns:
        ``max |out - prev|`` as a 0-dim tensor (NaN if any element is NaN), or an empty tensor
        when ``prev`` is None.
    """
    args = (drive, top_down, nudge, prev, gain, out)
    state_update_meta(*args)
    check_overlap(drive, top_down, nudge, prev, out)
    check_no_grad("state_update", (("drive", drive), ("top_down", top_down), ("nudge", nudge), ("prev", prev),
                                   ("out", out)))
    return run("state_update", drive.device, state_update_ref, (drive, top_down, nudge, prev, float(gain), out))
