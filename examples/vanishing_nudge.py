"""The vanishing nudge of deep EP networks, and what intermediate signals do about it.

On a deep preset (``deep8``: 8 convolutions on the bundled 8x8 digits, channels reduced so it
runs on a CPU in a few minutes), for the same initial weights and the same minibatch, with and
without intermediate error signals (docs/design.md, "The vanishing nudge"):

- per layer, the mean |s+ - s*| of the nudged state against the free equilibrium, at the
  training settings (``--beta``, ``--T1``, ``--T2``), and its ratio to the top layer's;
- per layer, the cosine between the layer's EP weight gradient and the BPTT gradient of the
  same total cost (``ep_reference.bptt_gradient``), in float64, both at the training settings
  and at the gradient-check settings (beta 1e-3, long converged phases: the theory's regime).

    python examples/vanishing_nudge.py                    # table, JSON and PNG in examples/results/
    python examples/vanishing_nudge.py --signals none,classifier --width 0.5

Configurations (``--signals``): ``none`` (output-only EP), ``classifier`` (a local classifier
after every block but the top), ``feature`` (feature distillation at the same places, to a
feed-forward teacher trained here by backprop for ``--teacher-epochs``), ``classifier+feature``.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

import ep_reference
from ep_kernels.app.data import load_dataset
from ep_kernels.app.teacher import train_teacher
from ep_kernels.models import build_network, build_signals, default_signal_layers
from ep_kernels.teacher import Teacher


def layer_cosines(net, g_ep, g_bp):
    """Per state layer: cosine of the concatenated (weight, bias) EP and BPTT gradients, and
    the EP gradient's norm relative to BPTT's."""
    out = []
    for i in range(len(net.layers)):
        names = [n for n in g_bp if n.startswith(f"layers.{i}.")]
        a = torch.cat([g_ep[n].flatten() for n in names]).double()
        b = torch.cat([g_bp[n].flatten() for n in names]).double()
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if b.norm() > 0 else float("nan")
        out.append({"cosine": cos, "norm_ratio": float(a.norm() / b.norm()) if b.norm() > 0 else float("nan"),
                    "bptt_norm": float(b.norm())})
    return out


def measure(net, x, y, teacher, beta, T1, T2, ep_dtype=torch.float64):
    """EP (fast path, in ``ep_dtype``) and BPTT (reference, float64) of the same total cost."""
    net64 = copy.deepcopy(net).double()
    x64 = x.double()
    tgt = None
    if teacher is not None:
        with torch.no_grad():
            t = teacher.targets(x.float())
        tgt = {"features": {k: v.double() for k, v in t["features"].items()}, "logits": t["logits"].double()}
    ep_net = copy.deepcopy(net).to(ep_dtype)
    ep_net.zero_grad(set_to_none=True)
    tgt_ep = None if tgt is None else {"features": {k: v.to(ep_dtype) for k, v in tgt["features"].items()},
                                       "logits": tgt["logits"].to(ep_dtype)}
    res = ep_net.ep_backward(x.to(ep_dtype), y, beta=beta, T1=T1, T2=T2, nudging="symmetric", teacher=tgt_ep)
    g_ep = {n: p.grad.detach().double().clone() for n, p in ep_net.named_parameters() if p.grad is not None}
    ref = ep_reference.ReferenceNet.from_module(net64)
    bp = ep_reference.bptt_gradient(ref, x64, y, T1, teacher=tgt)
    net = net64
    return {"nudge": res.diagnostics["nudge_magnitude"], "grad": res.diagnostics["grad_magnitude"],
            "free_residual": res.diagnostics["free"]["residual"], "layers": layer_cosines(net, g_ep, bp.grads)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="deep8")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--init-scale", type=float, default=None,
                   help="initial weight scale (default: the preset's, see ep_kernels/models.py)")
    p.add_argument("--schedule", choices=("synchronous", "alternating"), default=None,
                   help="relaxation schedule (default: the preset's)")
    p.add_argument("--tag", default="", help="suffix of the output files (vanishing_nudge<tag>.*)")
    p.add_argument("--signals", default="none,classifier,feature",
                   help="configurations, comma-separated: none, classifier, feature, classifier+feature")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.5, help="training beta (default: %(default)s)")
    p.add_argument("--T1", type=int, default=60, help="training free steps (default: %(default)s)")
    p.add_argument("--T2", type=int, default=20, help="training nudged steps (default: %(default)s)")
    p.add_argument("--check-T1", type=int, default=300)
    p.add_argument("--check-T2", type=int, default=150)
    p.add_argument("--check-beta", type=float, default=1e-3)
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()

    data = load_dataset("digits")
    torch.manual_seed(args.seed)
    base = build_network(args.preset, data.in_shape, data.n_classes, width=args.width, init_scale=args.init_scale,
                         schedule=args.schedule)
    args.schedule = base.schedule
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data.y_train), generator=g)[:args.batch]
    x, y = data.x_train[idx], data.y_train[idx]

    configs = [c.strip() for c in args.signals.split(",") if c.strip()]
    teacher = None
    if any("feature" in c for c in configs):
        teacher = Teacher.like(base, seed=args.seed)
        accs = train_teacher(teacher, data, epochs=args.teacher_epochs, seed=args.seed, progress=False,
                             log=lambda m: print(m, file=sys.stderr))
        teacher.eval()
        for q in teacher.parameters():
            q.requires_grad_(False)
        print(f"teacher (backprop, {args.teacher_epochs} epochs): test accuracy {100 * accs[-1]:.2f}%",
              file=sys.stderr)

    results = {"settings": dict(vars(args), out=os.path.relpath(args.out)), "signal_layers": default_signal_layers(base),
               "n_layers": len(base.layers), "channels": [l.out_channels for l in base.layers], "configs": {}}
    for c in configs:
        net = copy.deepcopy(base)
        kinds = () if c == "none" else tuple(c.split("+"))
        if kinds:
            torch.manual_seed(args.seed + 1)  # the heads' initialisation: the same in every config
            build_signals(net, kinds, "auto", args.lam)
        tch = teacher if "feature" in kinds else None
        print(f"[{c}] training settings (beta {args.beta}, T1 {args.T1}, T2 {args.T2}) ...", file=sys.stderr)
        train_m = measure(net, x, y, tch, args.beta, args.T1, args.T2)
        print(f"[{c}] gradient-check settings (beta {args.check_beta}, T1 {args.check_T1}, T2 {args.check_T2}) ...",
              file=sys.stderr)
        train32 = measure(net, x, y, tch, args.beta, args.T1, args.T2, ep_dtype=torch.float32)
        check_m = measure(net, x, y, tch, args.check_beta, args.check_T1, args.check_T2)
        results["configs"][c] = {"train": train_m, "train_float32": train32, "check": check_m}
    results["seconds"] = time.time() - t0

    table = format_table(results)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"vanishing_nudge{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=2)
    with open(stem + ".txt", "w") as f:
        f.write(table + "\n")
    plot(results, stem + ".png")
    print(f"wrote {stem}.{{json,txt,png}} in {results['seconds']:.0f} s", file=sys.stderr)
    return results


def format_table(r):
    s = r["settings"]
    sig = set(r["signal_layers"])
    init = "preset default" if s.get("init_scale") is None else s["init_scale"]
    lines = [f"{s['preset']} (width {s['width']}: channels {r['channels']}; init scale {init}, "
             f"{s.get('schedule')} schedule) on {s['batch']} digits, float64; signals at layers {sorted(sig)} (*)",
             f"train: beta {s['beta']}, T1 {s['T1']}, T2 {s['T2']};  check: beta {s['check_beta']}, "
             f"T1 {s['check_T1']}, T2 {s['check_T2']}",
             "columns per config: mean|s+ - s*| (train) | its ratio to the top layer's | cos(EP, BPTT) at the "
             "train settings, EP in float64 | same, EP in float32 (BPTT float64) | cos at the check settings"]
    head = "layer " + "".join(f"| {c:^51s}" for c in r["configs"])
    lines += [head, "-" * len(head)]
    n = r["n_layers"]
    for l in range(n):
        row = f"{l:>3d}{'*' if l in sig else ' '}  "
        for c, m in r["configs"].items():
            nud = m["train"]["nudge"]
            row += (f"| {nud[l]:9.2e} {nud[l] / nud[-1]:8.1e} {m['train']['layers'][l]['cosine']:9.5f} "
                    f"{m['train_float32']['layers'][l]['cosine']:9.5f} {m['check']['layers'][l]['cosine']:9.6f}  ")
        lines.append(row)
    return "\n".join(lines)


def plot(r, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    n = r["n_layers"]
    for c, m in r["configs"].items():
        axes[0].plot(range(n), m["train"]["nudge"], "o-", label=c)
        axes[1].plot(range(n), [v["cosine"] for v in m["train"]["layers"]], "o-", label=f"{c} (EP float64)")
        axes[1].plot(range(n), [v["cosine"] for v in m["train_float32"]["layers"]], "s--",
                     label=f"{c} (EP float32)")
        axes[2].plot(range(n), [1 - v["cosine"] for v in m["check"]["layers"]], "o-", label=c)
    for l in r["signal_layers"]:
        for ax in axes:
            ax.axvline(l, color="grey", alpha=0.2)
    s = r["settings"]
    axes[0].set(yscale="log", xlabel="layer", ylabel="mean |s+ - s*|", title=f"nudge (beta {s['beta']})")
    axes[1].set(xlabel="layer", ylabel="cos(EP, BPTT)", title=f"train settings T1 {s['T1']} T2 {s['T2']}")
    axes[2].set(yscale="log", xlabel="layer", ylabel="1 - cos(EP, BPTT)",
                title=f"check: beta {s['check_beta']} T1 {s['check_T1']} T2 {s['check_T2']}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"vanishing nudge: {s['preset']} width {s['width']}, grey = signal layers", fontsize=9)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
