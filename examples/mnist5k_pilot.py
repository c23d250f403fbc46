"""Short training pilots of a deep EP network on the 28x28 digits: does it learn at all?

Issue 12 needs a 6-convolution EP network on ``--dataset mnist5k`` that BPTT trains to 97%.
``examples/mnist5k_convergence.py`` measures whether a candidate's free phase converges and
its states depend on the input; this script asks the next question, for the same candidates
(``mnist5k_convergence.candidate`` and ``ARCH``), in a few minutes each:

- at init: the convergence numbers of ``mnist5k_convergence.measure`` (residual at step 50 and
  300, first step at residual <= 1e-4, per-layer relative spread and mean of the free state);
- ``--probe``: a linear probe per layer at the free fixed point (T 300): standardised states
  of 2,000 training digits, L-BFGS multinomial logistic regression (L2 1e-3), test accuracy on
  the 1,000 held-out digits: how much of the class is still linearly readable at each depth;
- ``--steps N``: N minibatches (batch 32, random with replacement, seeded) of BPTT through
  ``--T1`` steps (or EP with ``--algo ep``; or ``--algo feedforward``: the same weights used
  as a plain feed-forward network, conv -> max-pool -> clamp, trained by autograd, which
  tells whether the EP network's feedback is what stops it learning), with Adam or SGD
  (momentum 0.9); the held-out accuracy every ``--every`` steps.

Initial weights, layers past the first: PyTorch's default filters, ``--centre none`` / ``row``
(zero mean per output channel) / ``double`` (then also zero mean per input channel), times
``--scale``; the first layer times ``--first`` (default ``--scale``); biases PyTorch's default
times ``--bscale``, or ``--bias B`` for every layer past the first.

    python examples/mnist5k_pilot.py --scale 2 --bscale 2 --width 1 --opt sgd --lr 0.05 --T1 30
    python examples/mnist5k_pilot.py --scale 2 --bscale 2 --width 1 --opt sgd --lr 0.05 --algo feedforward --steps 400
    python examples/mnist5k_pilot.py --centre row --scale 1.5 --first 2 --bias 0 --probe --steps 0

One thread unless ``--threads``. What was measured with it: examples/results/mnist5k_pilots.md.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mnist5k_convergence as mc  # noqa: E402
from ep_kernels.app.config import parse_lrs  # noqa: E402
from ep_kernels.app.data import load_dataset  # noqa: E402
from ep_kernels.teacher import Teacher  # noqa: E402


def build(a):
    """The candidate network of the options (see the module docstring)."""
    net = mc.candidate(arch=a.arch, scale=1.0, centre=False, activation=a.act, bias=True, width=a.width,
                       seed=a.seed, schedule=a.schedule)
    with torch.no_grad():
        for i, layer in enumerate(net.layers):
            w = layer.weight
            if i > 0 and a.centre in ("row", "double"):
                w.sub_(w.mean(dim=(1, 2, 3), keepdim=True))
            if i > 0 and a.centre == "double":
                w.sub_(w.mean(dim=(0, 2, 3), keepdim=True))
            w.mul_(a.scale if i > 0 or a.first is None else a.first)
            if a.bias is None or i == 0:
                layer.bias.mul_(a.bscale)
            else:
                layer.bias.fill_(a.bias)
    net.T1, net.T2, net.beta, net.tol = a.T1, a.T2, a.beta, a.tol
    return net


def show(tag, net, x):
    m = mc.measure(net, x, 300)
    print(f"{tag}: r@50 {m['residual_at'][50]:.1e} r@300 {m['residual']:.1e} steps to 1e-4 {m['steps_to_tol']} "
          f"| spread {' '.join(f'{v:.2f}' for v in m['spread'])} | mean {' '.join(f'{v:.2f}' for v in m['mean'])}",
          flush=True)


def probe(net, d, n_train=2000):
    """Per layer, the held-out accuracy of a linear classifier on the free fixed point's states."""
    with torch.no_grad():
        train = net.free_phase(d.x_train[:n_train], T1=300)[0]
        test = net.free_phase(d.x_test, T1=300)[0]
    y = d.y_train[:n_train]
    for i, (f, fe) in enumerate(zip(train, test)):
        f, fe = f.flatten(1), fe.flatten(1)
        mu, sd = f.mean(0), f.std(0) + 1e-6
        f, fe = (f - mu) / sd, (fe - mu) / sd
        w = torch.zeros(f.shape[1], 10, requires_grad=True)
        b = torch.zeros(10, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(f @ w + b, y) + 1e-3 * w.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        acc = float(((fe @ w + b).argmax(1) == d.y_test).float().mean())
        print(f"probe layer {i + 1} ({f.shape[1]} units): test accuracy {acc:.3f}", flush=True)


def train(net, d, algo, steps, opt_name, lr, a):
    """``steps`` minibatches of ``algo``; the held-out accuracy every ``a.every`` steps. ``lr``: one
    rate, or one per layer then the readout. ``"feedforward"`` trains the EP network's own
    modules as the library's feed-forward ``Teacher`` (no top-down feedback)."""
    modules = list(net.layers) + [net.readout]
    if len(lr) not in (1, len(modules)):
        raise SystemExit(f"--lr: give 1 rate or {len(modules)} (one per layer, then the readout), got {len(lr)}")
    lr = lr * len(modules) if len(lr) == 1 else lr
    groups = [{"params": list(m.parameters()), "lr": v} for m, v in zip(modules, lr)]
    opt = torch.optim.Adam(groups) if opt_name == "adam" else torch.optim.SGD(groups, lr=lr[0], momentum=0.9)
    feedforward = Teacher(net.layers, net.readout, net.activation)  # shares the parameters
    g = torch.Generator().manual_seed(a.seed)
    t0, losses = time.time(), []
    for k in range(steps):
        idx = torch.randint(0, len(d.x_train), (32,), generator=g)
        x, y = d.x_train[idx], d.y_train[idx]
        opt.zero_grad()
        if algo == "feedforward":
            loss = F.cross_entropy(feedforward(x), y)
            loss.backward()
        else:
            loss = (net.bptt_backward(x, y) if algo == "bptt" else net.ep_backward(x, y)).loss
        losses.append(float(loss.detach()))
        opt.step()
        if (k + 1) % a.every == 0:
            with torch.no_grad():
                logits = feedforward(d.x_test) if algo == "feedforward" else net(d.x_test, T1=a.eval_T)
            acc = float((logits.argmax(1) == d.y_test).float().mean())
            print(f"{algo} step {k + 1} train loss {sum(losses[-a.every:]) / a.every:.3f} test {acc:.3f} "
                  f"{time.time() - t0:.0f}s", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="P", choices=sorted(mc.ARCH))
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--first", type=float, default=None, help="first layer's factor (default --scale)")
    p.add_argument("--centre", default="none", choices=("none", "row", "double"))
    p.add_argument("--bias", type=float, default=None, help="every later layer's bias (default: PyTorch's x bscale)")
    p.add_argument("--bscale", type=float, default=1.0)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--act", default="hardsigmoid", choices=sorted(mc.ACTIVATION_GAIN))
    p.add_argument("--schedule", default="alternating", choices=("alternating", "synchronous"))
    p.add_argument("--algo", default="bptt", choices=("bptt", "ep", "feedforward"))
    p.add_argument("--T1", type=int, default=30)
    p.add_argument("--T2", type=int, default=20)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--tol", type=float, default=None,
                   help="stop EP phases and evaluation at this residual (T1, T2, --eval-T as caps)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--opt", default="adam", choices=("adam", "sgd"))
    p.add_argument("--lr", type=parse_lrs, default=[1e-3],
                   help="one rate, or one per layer then the readout (comma-separated)")
    p.add_argument("--eval-T", type=int, default=150)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--probe", action="store_true")
    p.add_argument("--pretrain-ff", type=int, default=0, metavar="N",
                   help="first N feed-forward SGD steps (--pretrain-lr) on the same weights")
    p.add_argument("--pretrain-lr", type=parse_lrs, default=[0.05])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    d = load_dataset("mnist5k")
    net = build(a)
    show("init", net, d.x_train[:32])
    if a.probe and not a.pretrain_ff:
        probe(net, d)
    if a.pretrain_ff:
        train(net, d, "feedforward", a.pretrain_ff, "sgd", a.pretrain_lr, a)
        show("after feed-forward pretraining", net, d.x_train[:32])
        if a.probe:
            probe(net, d)
    train(net, d, a.algo, a.steps, a.opt, a.lr, a)
    show("end", net, d.x_train[:32])


if __name__ == "__main__":
    main()
