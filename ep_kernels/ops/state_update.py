"""The state update ``out = clamp(gain * (drive + top_down + nudge), 0, 1)``, fused.

``gain`` is 1 for the hard sigmoid ``clamp(x, 0, 1)`` and 0.5 for ``clamp(x/2, 0, 1)``.
``top_down`` and ``nudge`` may be None. Writes into ``out`` (preallocated, so relaxation
allocates nothing per step) and returns ``max |out - prev|`` as a 0-dim tensor (the change
used for convergence tests), or an empty tensor when ``prev`` is None. NaN propagates
(clamp(NaN) = NaN), so a diverging relaxation is detectable from the returned change.
"""
import torch

from ._common import check_float, check_no_grad, check_tensor, compiled_op, dispatch, overlaps, triton_op


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
    check_tensor(drive, "drive")
    check_float(drive, "drive")
    for name, t in (("top_down", top_down), ("nudge", nudge), ("prev", prev), ("out", out)):
        if t is None and name != "out":
            continue
        check_tensor(t, name, dtype=drive.dtype, device=drive.device)
        if t.shape != drive.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != drive shape {tuple(drive.shape)}")
    if prev is not None and overlaps(out, prev):
        raise ValueError("out must not alias prev (the change would be lost)")
    mode = dispatch(drive.device)
    if mode == "reference":
        return state_update_ref(drive, top_down, nudge, prev, float(gain), out)
    check_no_grad("state_update", (("drive", drive), ("top_down", top_down), ("nudge", nudge), ("prev", prev),
                                   ("out", out)))
    if mode == "triton":
        return triton_op("state_update")(drive, top_down, nudge, prev, float(gain), out)
    return compiled_op("state_update")(drive, top_down, nudge, prev, float(gain), out)
