"""Deep presets, default intermediate signals, teacher save/load, ep-train with signals and
distillation (tiny budgets)."""
import json
import os

import pytest
import torch

from ep_kernels.app import train
from ep_kernels.intermediate import FeatureDistillation, LocalClassifier, LogitDistillation
from ep_kernels.layers import EPConv2d
from ep_kernels.models import build_network, build_signals, default_signal_layers
from ep_kernels.teacher import Teacher, load_teacher, save_teacher

torch.set_num_threads(1)

TINY = ["--preset", "deep8", "--width", "0.25", "--limit-train", "64", "--limit-test", "32", "--batch-size", "32",
        "--T1", "4", "--T2", "2", "--threads", "1", "--no-progress", "--epochs", "1"]


@pytest.mark.parametrize("name,depth", [("vgg11", 8), ("vgg13", 10), ("vgg16", 13)])
def test_vgg_presets(name, depth):
    net = build_network(name, (3, 32, 32), 100, width=0.0625)
    assert len(net.layers) == depth
    assert all(isinstance(l, EPConv2d) and l.kernel_size == (3, 3) and l.padding == (1, 1) for l in net.layers)
    assert sum(l.pool == 2 for l in net.layers) == 5
    assert net.block_ends[-1] == depth - 1 and len(net.block_ends) == 5
    shape = (3, 32, 32)
    for l in net.layers:
        shape = l.state_shape(shape)
    assert shape == (32, 1, 1) and net.readout.in_features == 32 and net.readout.out_features == 100
    full = build_network(name, (3, 32, 32), 10)
    assert [l.out_channels for l in full.layers][-1] == 512
    with pytest.raises(ValueError, match="32x32"):
        build_network(name, (1, 8, 8), 10)


def test_deep8_and_signals():
    net = build_network("deep8", (1, 8, 8), 10, width=0.5)
    assert len(net.layers) == 8
    shape, shapes = (1, 8, 8), []
    for l in net.layers:
        shape = l.state_shape(shape)
        shapes.append(shape[1:])
    assert shapes == [(8, 8), (8, 8), (8, 8), (4, 4), (4, 4), (2, 2), (2, 2), (1, 1)]
    assert default_signal_layers(net) == [1, 3, 5]
    sigs = build_signals(net, ("classifier", "feature", "logit"), lambdas=[1.0, 0.5, 0.25], tau=2.0)
    assert len(net.signals) == 7 and list(net.signals) == sigs
    cls = [s for s in sigs if isinstance(s, LocalClassifier)]
    assert [s.layer for s in cls] == [1, 3, 5] and all(s.weight == 1.0 for s in cls)
    assert cls[1].head.in_features == net.layers[3].out_channels
    feat = [s for s in sigs if isinstance(s, FeatureDistillation)]
    assert [s.layer for s in feat] == [1, 3, 5] and all(s.weight == 0.5 for s in feat)
    logit = [s for s in sigs if isinstance(s, LogitDistillation)]
    assert len(logit) == 1 and logit[0].layer == "readout" and logit[0].tau == 2.0
    build_signals(net, "classifier", layers=[0, -1])
    assert [s.layer for s in net.signals] == [0, 7]
    with pytest.raises(ValueError, match="unknown signal kind 'bogus'"):
        build_signals(net, "classifier,bogus")
    with pytest.raises(ValueError, match="out of range"):
        build_signals(net, "classifier", layers=[8])
    with pytest.raises(ValueError, match="one per kind"):
        build_signals(net, ("classifier", "feature"), lambdas=[1, 2, 3])
    # one EP step with the default signals runs and trains the heads
    build_signals(net, "classifier")
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    res = net.ep_backward(x, y, beta=0.5, T1=5, T2=3)
    assert len(res.diagnostics["nudge_magnitude"]) == 8 and len(res.diagnostics["signal_losses"]) == 3
    assert all(s.head.weight.grad is not None for s in net.signals)


@pytest.mark.parametrize("activation,scale", [("hardsigmoid_half", 3.0), ("hardsigmoid", 1.5)])
def test_deep_presets_initialisation_and_schedule(activation, scale):
    """Deep presets: PyTorch's default filters, centred per output channel past the first
    layer, times 1.5 / gain; zero biases; default readout; the alternating schedule."""
    torch.manual_seed(0)
    net = build_network("deep8", (1, 8, 8), 10, activation=activation)
    torch.manual_seed(0)
    plain = build_network("deep8", (1, 8, 8), 10, activation=activation, init_scale=1.0)
    assert net.schedule == "alternating" and net.centred_init_scale == scale
    for i, (a, b) in enumerate(zip(net.layers, plain.layers)):
        torch.testing.assert_close(a.weight, scale * b.weight)
        assert a.bias.abs().max() == 0
        bound = 1 / (a.weight[0].numel() ** 0.5)  # PyTorch's default: uniform(-bound, bound)
        if i > 0:
            assert a.weight.mean(dim=(1, 2, 3)).abs().max() < 1e-6
            assert a.weight.abs().max() <= 2 * scale * bound
        else:
            assert a.weight.mean().abs() > 1e-4 and a.weight.abs().max() <= scale * bound
    assert net.readout.weight.abs().max() <= 1 / net.readout.in_features ** 0.5
    assert build_network("deep8", (1, 8, 8), 10, schedule="synchronous").schedule == "synchronous"
    small = build_network("small", (1, 8, 8), 10)
    assert small.schedule == "synchronous" and small.centred_init_scale is None
    with pytest.raises(ValueError, match="init_scale must be positive"):
        build_network("deep8", (1, 8, 8), 10, init_scale=0.0)
    # a teacher of a deep preset starts from the same scheme (fresh values)
    t = Teacher.like(net, seed=1)
    assert all(l.weight.mean(dim=(1, 2, 3)).abs().max() < 1e-6 for l in t.layers[1:])
    assert all(l.bias.abs().max() == 0 for l in t.layers)


def test_teacher_roundtrip(tmp_path):
    net = build_network("deep8", (1, 8, 8), 10, width=0.25)
    t = Teacher.like(net, seed=3)
    path = tmp_path / "t.pt"
    save_teacher(t, path, meta={"note": "x"})
    u = load_teacher(path, net)
    x = torch.rand(3, 1, 8, 8)
    a, b = t.targets(x), u.targets(x)
    assert torch.equal(a["logits"], b["logits"]) and set(a["features"]) == set(range(8))
    assert all(a["features"][l].shape[1:] == tuple(s) for l, s in
               zip(range(8), [(4, 8, 8), (4, 8, 8), (8, 8, 8), (8, 4, 4), (16, 4, 4), (16, 2, 2), (16, 2, 2), (16, 1, 1)]))
    other = build_network("deep8", (1, 8, 8), 10, width=0.5)
    with pytest.raises(ValueError, match="does not match"):
        load_teacher(path, other)


def _run(tmp_path, name, *args):
    rd = str(tmp_path / name)
    return train.main(TINY + ["--run-dir", rd] + list(args)), rd


def test_train_with_classifier_signals_and_resume(tmp_path, capsys):
    rc, rd = _run(tmp_path, "a", "--signals", "classifier", "--lambda", "0.5")
    assert rc == 0
    printed = capsys.readouterr().out
    # T1 = 4 is far from converged: the epoch line shows the residual, and a note says so once
    assert "free residual" in printed and printed.count("the free phase ends short of a fixed point") == 1
    for f in ("config.json", "metrics.json", "diagnostics.png", "curves.png", "checkpoint.pt"):
        assert os.path.isfile(os.path.join(rd, f)), f
    cfg = json.load(open(os.path.join(rd, "config.json")))["config"]
    assert cfg["signals"] == "classifier" and cfg["lambdas"] == "0.5" and cfg["signal_layers"] == "auto"
    assert [s["layer"] for s in cfg["signals_used"]] == [1, 3, 5]
    assert cfg["schedule"] is None and cfg["schedule_used"] == "alternating" and cfg["centred_init_scale"] == 3.0
    m = json.load(open(os.path.join(rd, "metrics.json")))
    d = m["epochs"][0]["diagnostics"]
    assert len(d["nudge_magnitude"]) == 8 and len(d["grad_magnitude"]) == 8
    ck = train.load_checkpoint(os.path.join(rd, "checkpoint.pt"))
    assert any(k.startswith("signals.") for k in ck["model"])
    names = [g["name"] for g in ck["optimizer"]["param_groups"]] if "name" in ck["optimizer"]["param_groups"][0] \
        else None
    assert names is None or "signals" in names
    # resume extends a non-cosine run with the same signals; 1 + 1 epochs == 2 epochs
    rc, rb = _run(tmp_path, "b", "--signals", "classifier", "--lambda", "0.5", "--no-cosine")
    assert rc == 0
    assert train.main(["--resume", rb, "--epochs", "2", "--no-progress"]) == 0
    rc, rc2 = _run(tmp_path, "c", "--signals", "classifier", "--lambda", "0.5", "--no-cosine", "--epochs", "2")
    a, b = train.load_checkpoint(os.path.join(rb, "checkpoint.pt")), train.load_checkpoint(
        os.path.join(rc2, "checkpoint.pt"))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_train_teacher_feature_distillation(tmp_path):
    rc, rd = _run(tmp_path, "kd", "--signals", "feature,logit", "--lambda", "0.1,0.2", "--tau", "2",
                  "--train-teacher", "--teacher-epochs", "1", "--no-cosine")
    assert rc == 0
    tfile = os.path.join(rd, "teacher.pt")
    assert os.path.isfile(tfile)
    cfg = json.load(open(os.path.join(rd, "config.json")))["config"]
    assert cfg["train_teacher"] and cfg["teacher_file"] == os.path.abspath(tfile)
    assert {s["kind"] for s in cfg["signals_used"]} == {"feature", "logit"}
    assert "teacher_test_acc" in cfg
    before = os.path.getmtime(tfile)
    assert train.main(["--resume", rd, "--epochs", "2", "--no-progress"]) == 0
    assert os.path.getmtime(tfile) == before  # loaded, not retrained
    # a saved teacher can be given to a new run
    rc, rd2 = _run(tmp_path, "kd2", "--signals", "feature", "--teacher", tfile)
    assert rc == 0
    assert json.load(open(os.path.join(rd2, "config.json")))["config"]["teacher_file"] == os.path.abspath(tfile)


@pytest.mark.parametrize("args,msg", [
    (["--signals", "bogus"], "unknown signal kind 'bogus'"),
    (["--signals", "feature"], "needs a teacher"),
    (["--signals", "feature", "--teacher", "/nonexistent/t.pt"], "no such file"),
    (["--signals", "classifier", "--train-teacher"], "only used by distillation"),
    (["--signals", "classifier", "--lambda", "1,2"], "one per kind"),
    (["--signals", "classifier", "--signal-layers", "9"], "out of range"),
])
def test_signal_option_errors(tmp_path, capsys, args, msg):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "bad", *args)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad" / "checkpoint.pt")
