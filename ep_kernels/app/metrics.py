"""What an ``ep-train`` run records: an epoch's running sums (a plain dict, stored in the
checkpoint so that a run stopped mid-epoch resumes them), the summary of the epochs done, and
the plots of the run folder (``curves.png``, ``diagnostics.png``).
"""
import torch

from .checkpoint import write_atomic


def flatten_numbers(d, prefix=""):
    """Nested diagnostics -> {"a.b": float or [floats]}; strings and other values are skipped."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_numbers(v, key + "."))
            continue
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().tolist()
        if isinstance(v, (bool, int, float)):
            out[key] = float(v)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(e, (bool, int, float, torch.Tensor)) for e in v):
            out[key] = [float(e) for e in v]
    return out


def new_partial():
    """The running sums of an epoch that has not started."""
    return {"loss_sum": 0.0, "correct": 0, "count": 0, "diag": {}, "seconds": 0.0}


def accumulate(partial, res, y):
    """Add one minibatch's result ``res`` (loss, logits, diagnostics) for targets ``y``."""
    n = y.shape[0]
    partial["loss_sum"] += float(res.loss) * n
    partial["correct"] += int((res.logits.argmax(1) == y.to(res.logits.device)).sum())
    partial["count"] += n
    for k, v in flatten_numbers(res.diagnostics or {}).items():
        if k not in partial["diag"]:
            partial["diag"][k] = [v, 1]
            continue
        s, c = partial["diag"][k]
        if isinstance(v, list) and isinstance(s, list) and len(v) == len(s):
            partial["diag"][k] = [[a + b for a, b in zip(s, v)], c + 1]
        elif isinstance(v, float) and isinstance(s, float):
            partial["diag"][k] = [s + v, c + 1]


def diag_means(partial):
    """The epoch means of the diagnostics summed in ``partial``."""
    out = {}
    for k, (s, c) in partial["diag"].items():
        out[k] = [v / c for v in s] if isinstance(s, list) else s / c
    return out


def summary(history):
    """Epochs done, final and best test accuracy (and its epoch) of a run's history."""
    if not history:
        return {"epochs_done": 0}
    best = max(history, key=lambda r: r["test_acc"])
    return {"epochs_done": len(history), "final_test_acc": history[-1]["test_acc"],
            "best_test_acc": best["test_acc"], "best_epoch": best["epoch"]}


def plot_curves(path, history, title=""):
    """Loss and accuracy per epoch (train and test), and the nudge magnitudes per layer if any."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    ep = [r["epoch"] for r in history]
    nudge = [r.get("diagnostics", {}).get("nudge_magnitude") for r in history]
    has_nudge = all(isinstance(v, list) for v in nudge) and nudge
    fig = Figure(figsize=(13 if has_nudge else 9, 3.8), layout="constrained")
    axes = fig.subplots(1, 3 if has_nudge else 2)
    ax = axes[0]
    ax.plot(ep, [r["train_loss"] for r in history], "o-", ms=3, label="train")
    ax.plot(ep, [r["test_loss"] for r in history], "o-", ms=3, label="test")
    ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot(ep, [100 * r["train_acc"] for r in history], "o-", ms=3, label="train")
    ax.plot(ep, [100 * r["test_acc"] for r in history], "o-", ms=3, label="test")
    ax.set_xlabel("epoch"), ax.set_ylabel("accuracy (%)"), ax.legend(), ax.grid(alpha=0.3)
    if has_nudge:
        ax = axes[2]
        for l in range(len(nudge[0])):
            ax.plot(ep, [v[l] for v in nudge], "o-", ms=3, label=f"layer {l + 1}")
        ax.set_xlabel("epoch"), ax.set_ylabel("mean |s+ - s*|"), ax.set_yscale("log"), ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))


def plot_diagnostics(path, history, title=""):
    """The paper's diagnostics over training: per layer, the epoch means of |s+ - s*| and of
    |g_theta| (log scale). Nothing is written when the history has none (BPTT)."""
    from matplotlib.figure import Figure

    rows = [r.get("diagnostics", {}) for r in history]
    keys = [k for k in ("nudge_magnitude", "grad_magnitude") if rows and all(isinstance(d.get(k), list) for d in rows)]
    if not keys:
        return
    ep = [r["epoch"] for r in history]
    fig = Figure(figsize=(5.5 * len(keys), 3.8), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    labels = {"nudge_magnitude": "mean |s+ - s*|", "grad_magnitude": "mean |g_theta|"}
    for ax, k in zip(axes, keys):
        for l in range(len(rows[0][k])):
            ax.plot(ep, [max(d[k][l], 1e-30) for d in rows], "o-", ms=3, label=f"layer {l}")
        ax.set_xlabel("epoch"), ax.set_ylabel(labels[k]), ax.set_yscale("log"), ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
