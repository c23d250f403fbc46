"""Trained weights for the time-to-gradient benchmark (issue 13): the benchmark's VGG-5
(``testing.vgg5(seed=0)``) trained by EP on the 40 real CIFAR images of ``bench/data`` with
augmentation (random crops of the 4-padded image, horizontal flips), the published recipe's
settings (per-layer SGD rates 0.25 .. 0.05, momentum 0.9, weight decay 3e-4, beta 1.0
symmetric), its T1 250 / T2 25 as caps of phases that stop at a change of 1e-4, alternating.

The weights go to ``bench/results/vgg5_samples_trained.pt`` (not committed: 15 MB; this script
makes them again, seeded). A checkpoint is written every ``--save-every`` steps, and a run
started again continues from it, so an interrupted run loses at most that many steps.

    python bench/train_vgg5_samples.py [--steps 300] [--out bench/results/vgg5_samples_trained.pt]
"""
import argparse
import json
import os
import sys
import time

import torch

from ep_kernels import testing, use_backend

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "cifar_samples.pt")
DEFAULT_OUT = os.path.join(HERE, "results", "vgg5_samples_trained.pt")


def augment(x, g):
    """Random 32x32 crops of the zero-padded (4 pixels) images, and horizontal flips."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", default="0.25,0.15,0.1,0.08,0.05", help="one per layer and the readout")
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (the benchmark's quick run: 1/16)")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    lrs = [float(v) for v in args.lr.split(",")]
    net = testing.vgg5(width=args.width, seed=0)
    net.schedule = "alternating"
    groups = [list(layer.parameters()) for layer in net.layers] + [list(net.readout.parameters())]
    if len(lrs) != len(groups):
        p.error(f"--lr: {len(groups)} rates needed (one per layer and the readout), got {len(lrs)}")
    opt = torch.optim.SGD([{"params": ps, "lr": lr} for ps, lr in zip(groups, lrs)], momentum=0.9,
                          weight_decay=3e-4)
    data = torch.load(DATA, weights_only=True)
    x_all, y_all = data["x"], data["y"]
    g = torch.Generator().manual_seed(args.seed)
    step, log = 0, []
    ckpt = args.out + ".partial"
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"])
        step, log = state["step"], state["log"]
        print(f"resuming at step {step} from {ckpt}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save(path, final):
        tmp = path + ".tmp"
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "rng": g.get_state(), "step": step,
                    "log": log, "final": final}, tmp)
        os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous file

    t0 = time.time()
    while step < args.steps:
        idx = torch.randperm(x_all.shape[0], generator=g)[:args.batch]
        x, y = augment(x_all[idx], g), y_all[idx]
        opt.zero_grad(set_to_none=True)
        with use_backend("cpu"):
            r = net.ep_backward(x, y, beta=1.0, T1=250, T2=25, nudging="symmetric", tol=1e-4)
        opt.step()
        step += 1
        d = r.diagnostics
        row = {"step": step, "loss": float(r.loss), "batch_acc": float((r.logits.argmax(1) == y).float().mean()),
               "free_steps": d["free"]["steps"], "nudged_steps": d["nudged"]["steps"],
               "seconds": round(time.time() - t0, 1)}
        log.append(row)
        if step % 10 == 0 or step == args.steps:
            print(json.dumps(row), flush=True)
        if step % args.save_every == 0:
            save(ckpt, False)
    save(args.out, True)
    if os.path.exists(ckpt):
        os.remove(ckpt)
    print(f"wrote {args.out} after {step} steps", flush=True)


if __name__ == "__main__":
    sys.exit(main())
