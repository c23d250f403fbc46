"""Does a deep EP network on the 28x28 digits relax, and do its states carry the input?

The measurement behind the ``mnist_vgg6`` preset (ep_kernels/models.py; issue 12, items 1-2).
For candidate networks (architecture, initial weights, activation, schedule), on a batch of the
bundled MNIST digits (``--dataset mnist5k``), from zero states with beta = 0 (the free phase):

- the max over layers of ``max |s_t - s_{t-1}|`` (the residual, docs/design.md "Convergence and
  divergence") after ``T`` steps, and the first step at which it is <= 1e-4;
- per layer, the relative spread of the free state over the batch: the RMS of ``s - mean_batch(s)``
  divided by the RMS of ``mean_batch(s)`` (0: the state no longer depends on the input), and
  the mean state (how much of the input's signal is left in it);
- optionally (``--checkpoint RUN_DIR``) the same at trained weights (an ``ep-train`` run).

    python examples/mnist5k_convergence.py                    # the candidates below, table + JSON
    python examples/mnist5k_convergence.py --only preset       # the preset at its own settings
    python examples/mnist5k_convergence.py --checkpoint runs/pilot_bptt

One thread (``torch.set_num_threads(1)``); results in examples/results/mnist5k_convergence*.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn

from ep_kernels import EPConv2d, EPNetwork
from ep_kernels.app.data import load_dataset
from ep_kernels.models import build_network, operator_norm
from ep_kernels.relaxation import ACTIVATION_GAIN, STEPS, prepare_layers

TOL = 1e-4
# Architectures, as (out_channels, pool, padding) per 3x3 convolution, for 28x28 inputs:
# A: the issue's: three VGG stages of two convolutions, padding 1, a 2x2 max-pool ending each
#    stage (28 -> 14 -> 7 -> 3);
# B: VGG-11's pattern of pools (after convolutions 1, 2, 4, 6; 28 -> 14 -> 7 -> 3 -> 1);
# P: a 2x2 max-pool after every convolution, padding 2 so that the maps last
#    (28 -> 15 -> 8 -> 5 -> 3 -> 2 -> 2): the preset mnist_vgg6.
ARCH = {
    "A": [(16, 1, 1), (16, 2, 1), (32, 1, 1), (32, 2, 1), (64, 1, 1), (64, 2, 1)],
    "B": [(16, 2, 1), (32, 2, 1), (64, 1, 1), (64, 2, 1), (64, 1, 1), (64, 2, 1)],
    "P": [(16, 2, 2), (16, 2, 2), (32, 2, 2), (32, 2, 2), (64, 2, 2), (64, 2, 2)],
}


def candidate(arch="A", scale=1.0, centre=True, activation="hardsigmoid_half", schedule="alternating", bias=False,
              width=1.0, seed=0, link=None, first=3.0, delta_orth=False, readout_gain=1.0):
    """An EP network of 3x3 convolutions (``ARCH[arch]``) from PyTorch's default filters,
    centred per output channel past the first layer if ``centre``, times ``scale``; zero biases
    (PyTorch's default ones if ``bias`` is True; a number: later layers' biases start there;
    ``"first"``: PyTorch's default bias in the first layer, no bias in later ones); the readout as
    PyTorch makes it, its weight times ``readout_gain``.
    ``link``: instead, the first layer is multiplied by ``first`` and every later one scaled so
    that ``gain * ||W||`` (its convolution's operator norm at its input size times the
    activation's gain) equals ``link``. ``delta_orth``: later layers start from an orthogonal
    channel matrix on the centre tap (other taps 0), centred, then scaled to ``link``."""
    torch.manual_seed(seed)
    c, hw, layers, sizes = 1, 28, [], []
    for out, pool, pad in ARCH[arch]:
        out = max(1, int(round(out * width)))
        layers.append(EPConv2d(c, out, 3, padding=pad, pool=pool, bias=bias != "first" or not layers))
        sizes.append(hw)
        c, hw = out, (hw + 2 * pad - 2) // pool
    act_gain = ACTIVATION_GAIN[activation]
    with torch.no_grad():
        for i, l in enumerate(layers):
            if delta_orth and i > 0:
                l.weight.zero_()
                nn.init.orthogonal_(l.weight[:, :, 1, 1])
            if centre and i > 0:
                l.weight.sub_(l.weight.mean(dim=(1, 2, 3), keepdim=True))
            if link is None:
                l.weight.mul_(scale)
            else:
                norm = operator_norm(l, (l.in_channels, sizes[i], sizes[i])) if i > 0 else None
                l.weight.mul_(first if i == 0 else link / (act_gain * norm))
            if bias == "first" or bias is True:
                pass  # PyTorch's default biases where there are biases
            elif bias is False:
                l.bias.zero_()
            elif bias is not True and i > 0:  # a number: every layer past the first starts there
                l.bias.fill_(float(bias))
            elif bias is not True:
                l.bias.zero_()
        readout = nn.Linear(c * hw * hw, 10)
        readout.weight.mul_(readout_gain)
    return EPNetwork(*layers, readout=readout, activation=activation, schedule=schedule)


@torch.no_grad()
def relax_trace(net, x, T):
    """The free phase from zero states, one step at a time: (states, per-step max residual)."""
    layers = net.layers
    prepared = prepare_layers(layers)
    plan = net.plan_for(x)
    states = [torch.zeros((x.shape[0],) + s, dtype=x.dtype) for s in plan.state_shapes]
    spare = [torch.empty_like(s) for s in states]
    shapes = [tuple(x.shape[1:])] + [tuple(s.shape[1:]) for s in states[:-1]]
    first = layers[0].drive(x, prepared[0])
    gain = ACTIVATION_GAIN[net.activation]
    step, cache, trace = STEPS[net.schedule], {}, []
    for _ in range(T):
        changes = step(layers, first, states, spare, shapes, prepared, None, gain, cache)
        states, spare = spare, states
        trace.append(max(float(c) for c in changes))
    return states, trace


def spread(s):
    """RMS over the batch of ``s - mean_batch(s)`` over the RMS of ``mean_batch(s)``."""
    m = s.mean(0, keepdim=True)
    return float((s - m).pow(2).mean().sqrt() / m.pow(2).mean().sqrt().clamp_min(1e-30))


def measure(net, x, T, omega=None):
    """Residual trace, steps to ``TOL`` and the free states' spread and mean per layer, under the
    library's step (``omega`` None) or the relaxed alternating step of ``relax_trace_relaxed``."""
    states, trace = relax_trace(net, x, T) if omega is None else relax_trace_relaxed(net, x, T, omega)
    hit = next((t + 1 for t, r in enumerate(trace) if r <= TOL), None)
    return {"residual": trace[-1], "steps_to_tol": hit, "trace": trace,
            "residual_at": {t: trace[t - 1] for t in (50, 100, 200, 300) if t <= T},
            "spread": [spread(s) for s in states], "mean": [float(s.mean()) for s in states],
            "active": [float((s > 0).float().mean()) for s in states],
            "saturated": [float((s >= 1).float().mean()) for s in states]}


def fmt(name, m):
    hit = "-" if m["steps_to_tol"] is None else str(m["steps_to_tol"])
    at = " ".join(f"{m['residual_at'].get(t, float('nan')):7.1e}" for t in (50, 100, 200))
    sp = " ".join(f"{v:4.2f}" for v in m["spread"])
    mean = " ".join(f"{v:7.1e}" for v in m["mean"])
    return f"{name:40s} {at} {m['residual']:7.1e} {hit:>5s} | {sp} | {mean}"


HEADER = (f"{'candidate':40s} {'r@50':>7s} {'r@100':>7s} {'r@200':>7s} {'r@T':>7s} {'<=1e-4':>5s} | "
          "relative spread, layers 1-6 | mean free state, layers 1-6")

# name -> (candidate() keywords, relaxation factor or None): the levers, in the order reported.
CANDIDATES = {
    "A centred x1, default biases": (dict(scale=1.0, bias=True), None),
    "A centred x1": (dict(scale=1.0), None),
    "A centred x2": (dict(scale=2.0), None),
    "A centred x3": (dict(scale=3.0), None),
    "A centred x3 synchronous": (dict(scale=3.0, schedule="synchronous"), None),
    "A uncentred x1": (dict(scale=1.0, centre=False), None),
    "A uncentred x2": (dict(scale=2.0, centre=False), None),
    "A link 0.8": (dict(link=0.8), None),
    "A link 0.8 synchronous": (dict(link=0.8, schedule="synchronous"), None),
    "A link 1.0": (dict(link=1.0), None),
    "A link 1.0 synchronous": (dict(link=1.0, schedule="synchronous"), None),
    "A link 1.2": (dict(link=1.2), None),
    "A link 0.8 hardsigmoid": (dict(link=0.8, first=1.5, activation="hardsigmoid"), None),
    "A delta-orthogonal link 0.8": (dict(link=0.8, delta_orth=True), None),
    "A delta-orthogonal link 1.0": (dict(link=1.0, delta_orth=True), None),
    "B link 1.0": (dict(arch="B", link=1.0), None),
    "B link 1.3": (dict(arch="B", link=1.3), None),
    "P centred x2": (dict(arch="P", scale=2.0), None),
    "P link 1.0": (dict(arch="P", link=1.0), None),
    "P link 1.15": (dict(arch="P", link=1.15), None),
    "P link 1.3 (mnist_vgg6)": (dict(arch="P", link=1.3), None),
    "P link 1.3 synchronous": (dict(arch="P", link=1.3, schedule="synchronous"), None),
    "P link 1.6": (dict(arch="P", link=1.6), None),
    "P link 2.0": (dict(arch="P", link=2.0), None),
    "P delta-orthogonal link 0.7": (dict(arch="P", link=0.7, delta_orth=True), None),
    "P delta-orthogonal link 0.8": (dict(arch="P", link=0.8, delta_orth=True), None),
    "P link 1.3, damped 0.7 *": (dict(arch="P", link=1.3), 0.7),
    "P link 1.3, over-relaxed 1.4 *": (dict(arch="P", link=1.3), 1.4),
    "P link 1.3, over-relaxed 1.6 *": (dict(arch="P", link=1.3), 1.6),
    "P link 1.6, over-relaxed 1.6 *": (dict(arch="P", link=1.6), 1.6),
}
NOTES = """Free phase from zero states on the first 32 training digits of mnist5k, float32, one
thread; alternating schedule unless noted. r@t: max over layers and batch of |s_t - s_(t-1)|;
<=1e-4: first step at which it is <= 1e-4 ('-': not within T). Spread: RMS over the batch of
s - mean_batch(s) over the RMS of mean_batch(s) (0: the state does not depend on the input).
Architectures (see ARCH): A 16-16-32-32-64-64, padding 1, pools after convs 2, 4, 6; B pools
after convs 1, 2, 4, 6; P (mnist_vgg6) a pool after every conv, padding 2. 'centred xk':
PyTorch's default filters centred per output channel (past the first layer) times k, zero
biases. 'link a': first layer x3, every later layer scaled to gain * ||W|| = a (operator norm).
* not the library's dynamics: each alternating half-step moves s to s + w (sigma(...) - s)."""


def load_trained(run_dir, data):
    """The network of an ``ep-train`` run folder at its trained weights (signal heads left out:
    the free phase does not use them)."""
    from ep_kernels.app.checkpoint import load_checkpoint
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    cfg = ckpt["config"]
    net = build_network(cfg["preset"], data.in_shape, data.n_classes, activation=cfg["activation"],
                        init_scale=cfg["init_scale"], width=cfg["width"],
                        schedule=cfg.get("schedule") or cfg.get("schedule_used"))
    net.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.startswith("signals.")})
    return net


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--offset", type=int, default=0, help="first training digit of the batch")
    p.add_argument("--T", type=int, default=300)
    p.add_argument("--only", default=None, help="comma-separated candidate names, or 'preset'")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", action="append", default=[], help="an ep-train run folder (repeatable)")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("mnist5k")
    x = data.x_train[args.offset:args.offset + args.batch]  # classes interleaved: balanced
    jobs = []
    for run in args.checkpoint:
        jobs.append((f"trained {os.path.basename(os.path.normpath(run))}", lambda run=run: load_trained(run, data),
                     None))
    names = [] if args.checkpoint and not args.only else (
        list(CANDIDATES) if args.only is None else [n.strip() for n in args.only.split(",")])
    for n in names:
        if n == "preset":
            def make(w=args.width):
                torch.manual_seed(args.seed)
                return build_network("mnist_vgg6", data.in_shape, 10, width=w)
            jobs.append((f"mnist_vgg6 width {args.width} seed {args.seed}", make, None))
        else:
            kw, omega = CANDIDATES[n]
            jobs.append((n, lambda kw=kw: candidate(width=args.width, seed=args.seed, **kw), omega))
    lines = [NOTES, f"batch {args.batch} from digit {args.offset}, T {args.T}, width {args.width}, seed {args.seed}",
             HEADER]
    print("\n".join(lines), flush=True)
    results = {}
    for n, make, omega in jobs:
        m = measure(make(), x, args.T, omega)
        results[n] = m
        lines.append(fmt(n, m))
        print(lines[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"mnist5k_convergence{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump({"settings": dict(vars(args), out=os.path.relpath(args.out)), "results": results}, f)
    with open(stem + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.txt and .json", file=sys.stderr)


@torch.no_grad()
def relax_trace_relaxed(net, x, T, omega):
    """As ``relax_trace`` under the alternating schedule with a relaxation factor: each half-step
    moves its layers to ``clamp(s + omega * (sigma(dPhi/ds) - s), 0, 1)`` (omega 1: the library's
    step; < 1 damped; > 1 over-relaxed). Not a library option: measured here to judge one."""
    layers, L = net.layers, len(net.layers)
    prepared = prepare_layers(layers)
    gain = ACTIVATION_GAIN[net.activation]
    plan = net.plan_for(x)
    s = [torch.zeros((x.shape[0],) + sh, dtype=x.dtype) for sh in plan.state_shapes]
    shapes = [tuple(x.shape[1:])] + [tuple(v.shape[1:]) for v in s[:-1]]
    first = layers[0].drive(x, prepared[0])
    trace = []
    for _ in range(T):
        change = 0.0
        for half in (0, 1):
            new = {}
            for l in range(half, L, 2):
                h = (first if l == 0 else layers[l].drive(s[l - 1], prepared[l]))[0]
                if l + 1 < L:
                    idx = layers[l + 1].drive(s[l], prepared[l + 1])[1]
                    h = h + layers[l + 1].top_down(s[l + 1], idx, shapes[l + 1], prepared[l + 1])
                target = (gain * h).clamp(0, 1)
                new[l] = (s[l] + omega * (target - s[l])).clamp(0, 1)
            for l, v in new.items():
                change = max(change, float((v - s[l]).abs().max()))
                s[l] = v
        trace.append(change)
    return s, trace


if __name__ == "__main__":
    main()
