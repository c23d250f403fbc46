"""ep-train end to end on a tiny budget: run folder, exact resume, interrupts, bad options."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from ep_kernels import EPNetwork
from ep_kernels.app import train
from ep_kernels.app.config import resolve_threads
from ep_kernels.models import build_network

# A tiny budget: a one-layer EP MLP on 96 digits, a few relaxation steps.
TINY = ["--preset", "mlp", "--limit-train", "96", "--limit-test", "40", "--batch-size", "32", "--T1", "5",
        "--T2", "3", "--threads", "1", "--no-progress", "--lr", "0.05"]


def run(tmp_path, name, *args):
    rd = str(tmp_path / name)
    rc = train.main(TINY + ["--run-dir", rd] + list(args))
    return rc, rd


def ckpt(rd):
    return train.load_checkpoint(os.path.join(rd, "checkpoint.pt"))  # weights_only=True


def assert_same_run(rd_a, rd_b):
    """Bitwise-equal weights and optimizer state, equal metrics (apart from timings)."""
    a, b = ckpt(rd_a), ckpt(rd_b)
    assert a["epoch"] == b["epoch"] and a["batch"] == b["batch"] == 0
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    drop = ("seconds", "train_seconds")
    ha = [{k: v for k, v in r.items() if k not in drop} for r in a["history"]]
    hb = [{k: v for k, v in r.items() if k not in drop} for r in b["history"]]
    assert ha == hb
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and torch.equal(a["rng"]["data"], b["rng"]["data"])


def test_end_to_end_run_folder(tmp_path, capsys):
    rc, rd = run(tmp_path, "a", "--epochs", "2")
    assert rc == 0
    assert sorted(os.listdir(rd)) == ["checkpoint.pt", "config.json", "curves.png", "diagnostics.png", "metrics.json"]
    with open(os.path.join(rd, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["config"]["preset"] == "mlp" and cfg["config"]["epochs"] == 2 and cfg["config"]["T1"] == 5
    with open(os.path.join(rd, "metrics.json")) as f:
        m = json.load(f)
    assert m["status"] == "done" and m["epochs_done"] == 2 and len(m["epochs"]) == 2
    row = m["epochs"][-1]
    for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"):
        assert k in row
    assert 0.0 <= row["test_acc"] <= 1.0 and len(row["lr"]) == 2  # layers.0 and readout
    # the diagnostics of ep_backward, averaged over the epoch: one value per layer
    assert len(row["diagnostics"]["nudge_magnitude"]) == 1
    with open(os.path.join(rd, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    c = ckpt(rd)
    assert c["epoch"] == 2 and set(c["model"]) == {"layers.0.weight", "layers.0.bias", "readout.weight", "readout.bias"}
    assert "final test accuracy" in capsys.readouterr().out


def test_bptt_and_per_layer_lrs(tmp_path):
    rc, rd = run(tmp_path, "b", "--epochs", "1", "--algorithm", "bptt", "--lr", "0.1,0.02", "--no-cosine")
    assert rc == 0
    groups = ckpt(rd)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.1, 0.02] and [g["name"] for g in groups] == ["layers.0", "readout"]


def test_same_seed_same_run(tmp_path):
    _, a = run(tmp_path, "a", "--epochs", "1", "--nudging", "random-sign")
    _, b = run(tmp_path, "b", "--epochs", "1", "--nudging", "random-sign")
    assert_same_run(a, b)


def test_resume_extends_a_run_exactly(tmp_path):
    # 2 epochs, then resume to 3 == 3 epochs (no cosine: its schedule fixes the epoch count)
    _, full = run(tmp_path, "full", "--epochs", "3", "--no-cosine", "--nudging", "random-sign")
    _, part = run(tmp_path, "part", "--epochs", "2", "--no-cosine", "--nudging", "random-sign")
    assert ckpt(part)["epoch"] == 2
    assert train.main(["--resume", part, "--epochs", "3", "--no-progress"]) == 0
    assert_same_run(full, part)
    with open(os.path.join(part, "metrics.json")) as f:
        assert json.load(f)["epochs_done"] == 3


def _patch_ep_backward(monkeypatch, at_call, action):
    orig = EPNetwork.ep_backward
    calls = {"n": 0}

    def patched(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == at_call:
            action()
        return orig(self, *a, **k)

    monkeypatch.setattr(EPNetwork, "ep_backward", patched)


def test_ctrl_c_saves_mid_epoch_and_resume_is_exact(tmp_path, monkeypatch, capsys):
    _, full = run(tmp_path, "full", "--epochs", "3")
    # First Ctrl-C in epoch 2 (3 minibatches per epoch): the minibatch finishes, then it saves.
    _patch_ep_backward(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGINT))
    rc, part = run(tmp_path, "part", "--epochs", "3")
    assert rc == train.EXIT_INTERRUPTED
    assert "--resume" in capsys.readouterr().err
    c = ckpt(part)
    assert (c["epoch"], c["batch"]) == (1, 2)
    with open(os.path.join(part, "metrics.json")) as f:
        assert json.load(f)["status"] == "interrupted"
    monkeypatch.undo()
    assert train.main(["--resume", part, "--no-progress"]) == 0
    assert_same_run(full, part)


def test_raw_keyboard_interrupt_keeps_a_resumable_state(tmp_path, monkeypatch):
    _, full = run(tmp_path, "full", "--epochs", "2", "--nudging", "random-sign")

    def boom():
        raise KeyboardInterrupt

    # Interrupted inside ep_backward of the 2nd minibatch of epoch 2: saved at its start.
    _patch_ep_backward(monkeypatch, 5, boom)
    rc, part = run(tmp_path, "part", "--epochs", "2", "--nudging", "random-sign")
    assert rc == train.EXIT_INTERRUPTED
    c = ckpt(part)
    assert (c["epoch"], c["batch"]) == (1, 1)
    monkeypatch.undo()
    assert train.main(["--resume", part, "--no-progress"]) == 0
    assert_same_run(full, part)


def test_max_minutes_stops_cleanly_and_resumes(tmp_path, capsys):
    _, full = run(tmp_path, "full", "--epochs", "2")
    rc, part = run(tmp_path, "part", "--epochs", "2", "--max-minutes", "1e-6")
    assert rc == 0 and "--max-minutes" in capsys.readouterr().err
    c = ckpt(part)
    assert (c["epoch"], c["batch"]) == (0, 1)  # stopped after the first minibatch
    assert train.main(["--resume", part, "--no-progress"]) == 0
    assert_same_run(full, part)


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--T1", "0"], "--T1"),
    (["--beta", "-0.5"], "--beta"),
    (["--lr", "0.1,abc"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--preset", "resnet"], "--preset"),
    (["--nudging", "sideways"], "--nudging"),
    (["--epochs", "2.5"], "--epochs"),
])
def test_bad_options_are_argparse_errors(capsys, argv, needle):
    assert needle in _usage_error(capsys, argv)


def test_bad_option_combinations(tmp_path, capsys):
    rd = str(tmp_path / "x")
    # one learning rate per parameter group, or one for all
    assert "--lr has 3 values" in _usage_error(capsys, TINY + ["--run-dir", rd, "--lr", "0.1,0.1,0.1"])
    assert "--data-dir" in _usage_error(capsys, TINY + ["--run-dir", rd, "--dataset", "cifar10"])
    assert "not an ep-train run folder" in _usage_error(capsys, ["--resume", str(tmp_path / "nowhere")])
    _, rd = run(tmp_path, "done", "--epochs", "1")
    assert "--resume" in _usage_error(capsys, TINY + ["--run-dir", rd])  # would overwrite a run
    err = _usage_error(capsys, ["--resume", rd, "--lr", "0.2"])
    assert "--lr" in err and "config" in err
    assert "--cosine" in _usage_error(capsys, ["--resume", rd, "--epochs", "5"])


def test_default_threads_are_resolved_and_recorded():
    cfg = dict(train.DEFAULTS)
    assert resolve_threads(dict(cfg))["threads"] == 1  # small preset on CPU
    assert resolve_threads(dict(cfg, threads=3))["threads"] == 3
    assert resolve_threads(dict(cfg, preset="vgg5"))["threads"] == torch.get_num_threads()


def test_presets_shapes():
    net = build_network("small", (1, 8, 8), 10)
    assert [(l.in_channels, l.out_channels, l.pool) for l in net.layers] == [(1, 64, 2), (64, 128, 2)]
    assert net.readout.in_features == 128 * 2 * 2
    vgg = build_network("vgg5", (3, 32, 32), 10, width=0.125)  # narrow, same topology
    assert [l.padding for l in vgg.layers] == [(1, 1), (1, 1), (1, 1), (0, 0)]
    assert all(l.pool == 2 and l.kernel_size == (3, 3) for l in vgg.layers)
    assert [l.out_channels for l in vgg.layers] == [16, 32, 64, 64] and vgg.readout.in_features == 64
    full = build_network("vgg5", (3, 32, 32), 100)
    assert [l.out_channels for l in full.layers] == [128, 256, 512, 512] and full.readout.in_features == 512
    with pytest.raises(ValueError, match="32x32"):
        build_network("vgg5", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="--preset"):
        build_network("nope", (1, 8, 8), 10)
    # init_scale multiplies PyTorch's default initialisation
    torch.manual_seed(0)
    a = build_network("mlp", (1, 8, 8), 10)
    torch.manual_seed(0)
    b = build_network("mlp", (1, 8, 8), 10, init_scale=0.5)
    assert torch.allclose(b.layers[0].weight, 0.5 * a.layers[0].weight)


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "ep_kernels.app.train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--resume" in out.stdout and "--algorithm" in out.stdout
