"""Intermediate error signals (docs/design.md, "How signals enter the cost and the nudges"): the fast path against the independent
reference ``ep_reference``, which gets the same terms by writing the cost
``C = L_out + sum_l lambda_l L_l(s_l)`` into ``Phi_beta = Phi - beta C`` and relaxing by
autograd (so its extra nudges are never written by hand).

Everything is float64 on tiny networks: two pooled convs and a readout, and two linear
layers and a readout, with each kind of signal alone and all together. Heads and maps get
fresh random values (not the identity a FeatureDistillation starts from), teacher targets
are fresh random tensors.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ep_reference as R
from ep_kernels import EPConv2d, EPLinear, EPNetwork
from ep_kernels.intermediate import FeatureDistillation, LocalClassifier, LogitDistillation

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread_module")


# --------------------------------------------------------------------------------------
# Networks, signals, teacher targets
# --------------------------------------------------------------------------------------
# conv: x (2, 8, 8) -> s_1 (5, 4, 4) -> s_2 (7, 2, 2) -> readout 28 -> 10
# linear: x (128,) -> s_1 (12,) -> s_2 (10,) -> readout 10 -> 10
def _signals(kind, which):
    if kind == "conv":
        make = {
            "classifier": lambda: LocalClassifier(0, 5, 10, weight=0.5, pool_size=2),
            "feature": lambda: FeatureDistillation(1, 7, teacher_channels=3, weight=0.3),
            "logit_readout": lambda: LogitDistillation("readout", weight=0.7, tau=2.0),
            "logit_hidden": lambda: LogitDistillation(0, in_channels=5, n_classes=10, weight=0.4, tau=3.0),
        }
    else:
        make = {
            "classifier": lambda: LocalClassifier(0, 12, 10, weight=0.5),
            "feature": lambda: FeatureDistillation(0, 12, teacher_channels=6, weight=0.3, conv=False),
            "logit_readout": lambda: LogitDistillation("readout", weight=0.7, tau=2.0),
            "logit_hidden": lambda: LogitDistillation(-2, in_channels=12, n_classes=10, weight=0.4, tau=3.0),
        }
    return [f() for f in make.values()] if which == "all" else [make[which]()]


def make(kind, which="all", seed=0, n=4, activation="hardsigmoid_half"):
    """(net, x, y, teacher): an EPNetwork with signals, a batch, and teacher targets."""
    torch.manual_seed(seed)
    if kind == "conv":
        layers, feat = [EPConv2d(2, 5, 3, padding=1, pool=2), EPConv2d(5, 7, 3, padding=1, pool=2)], 28
    else:
        layers, feat = [EPLinear(2 * 8 * 8, 12), EPLinear(12, 10)], 10
    net = EPNetwork(*layers, readout=nn.Linear(feat, 10), activation=activation,
                    signals=_signals(kind, which)).to(DT)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("signals."):
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=DT))
    x = torch.rand(n, 2, 8, 8, generator=g, dtype=DT)
    if kind == "linear":
        x = x.flatten(1)
    y = torch.randint(0, 10, (n,), generator=g)
    teacher = {"features": {}, "logits": 2.0 * torch.randn(n, 10, generator=g, dtype=DT)}
    shapes = {"conv": [(5, 4, 4), (7, 2, 2)], "linear": [(12,), (10,)]}[kind]
    for sig in net.signals:
        if sig.kind == "feature":
            tc = sig.map.out_channels if isinstance(sig.map, nn.Conv2d) else sig.map.out_features
            shape = (n, tc) + shapes[sig.layer][1:]
            teacher["features"][sig.layer] = torch.rand(shape, generator=g, dtype=DT)
    return net, x, y, teacher


def grads(net):
    return {n: p.grad.detach().clone() for n, p in net.named_parameters()}


def maxdiff(a, b):
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def without_signals(ref):
    r = ref.to(DT)
    r.signals = []
    r.params = {k: v for k, v in r.params.items() if not k.startswith("signals.")}
    return r


KINDS = ["conv", "linear"]
WHICH = ["classifier", "feature", "logit_readout", "logit_hidden", "all"]


# --------------------------------------------------------------------------------------
# The reference reads the signals and states the losses independently
# --------------------------------------------------------------------------------------
def test_from_module_reads_signals_by_name():
    net, x, y, t = make("conv", "all")
    ref = R.ReferenceNet.from_module(net)
    assert list(ref.params) == [n for n, _ in net.named_parameters()]
    for n, p in net.named_parameters():
        assert torch.equal(ref.params[n], p) and ref.params[n] is not p
    got = [(s.kind, s.layer, s.index, s.weight, s.tau, s.pool_size) for s in ref.signals]
    assert got == [("classifier", 0, 0, 0.5, 1.0, 2), ("feature", 1, 1, 0.3, 1.0, 1),
                   ("logit", "readout", 1, 0.7, 2.0, 1), ("logit", 0, 0, 0.4, 3.0, 1)]
    assert ref.signals[0].head == ("signals.0.head.weight", "signals.0.head.bias")
    assert ref.signals[1].map == ("signals.1.map.weight", "signals.1.map.bias")
    assert ref.signals[2].head is None and ref.needs_teacher
    assert ref.head_param_names == [n for n in ref.params if not n.startswith("layers.")]
    lin = R.ReferenceNet.from_module(make("linear", "logit_hidden")[0])
    assert lin.signals[0].layer == -2 and lin.signals[0].index == 0


@pytest.mark.parametrize("kind", KINDS)
def test_reference_signal_costs_have_the_closed_form_gradients(kind):
    """dC/ds by autograd of the reference's cost equals the hand-written derivatives:
    CE head: pool^T W^T (softmax(h) - onehot); feature: M^T (M s + b - t);
    logit KD: tau (softmax(h/tau) - softmax(t/tau)) through the head or the readout."""
    net, x, y, t = make(kind, "all")
    ref = R.ReferenceNet.from_module(net)
    g = torch.Generator().manual_seed(7)
    states = [torch.rand(s.shape, generator=g, dtype=DT) for s in R.init_states(ref, x)]
    P = ref.params
    with torch.enable_grad():
        st = [s.clone().requires_grad_() for s in states]
        auto = torch.autograd.grad(R.cost(ref, st, y, teacher=t).sum(), st)

    def through_head(s, w, b, pool_size, dlogits):
        if s.dim() == 4:
            p = F.adaptive_avg_pool2d(s, pool_size)
            gp = (dlogits @ w).view_as(p)
            bh, bw = s.shape[2] // pool_size, s.shape[3] // pool_size  # divisible here
            return gp.repeat_interleave(bh, 2).repeat_interleave(bw, 3) / (bh * bw)
        return (dlogits @ w).view_as(s)

    onehot = F.one_hot(y, 10).to(DT)
    expl = [torch.zeros_like(s) for s in states]
    ro = states[-1].flatten(1) @ P["readout.weight"].t() + P["readout.bias"]
    expl[-1] += ((torch.softmax(ro, 1) - onehot) @ P["readout.weight"]).view_as(states[-1])
    for sig in ref.signals:
        s = states[sig.index]
        if sig.kind == "feature":
            w, b = P[sig.map[0]], P[sig.map[1]]
            tt = t["features"][sig.layer]
            if w.dim() == 4:
                w2 = w[:, :, 0, 0]
                r = torch.einsum("tc,nchw->nthw", w2, s) + b.view(1, -1, 1, 1) - tt
                d = torch.einsum("tc,nthw->nchw", w2, r)
            else:
                d = (s @ w.t() + b - tt) @ w
        else:
            if sig.kind == "logit" and sig.layer == "readout":
                h, w = ro, P["readout.weight"]
            else:
                w, b = P[sig.head[0]], P[sig.head[1]]
                pooled = F.adaptive_avg_pool2d(s, sig.pool_size).flatten(1) if s.dim() == 4 else s
                h = pooled @ w.t() + b
            if sig.kind == "classifier":
                dh = torch.softmax(h, 1) - onehot
            else:
                dh = sig.tau * (torch.softmax(h / sig.tau, 1) - torch.softmax(t["logits"] / sig.tau, 1))
            d = (dh @ w).view_as(s) if sig.layer == "readout" else through_head(s, w, None, sig.pool_size, dh)
        expl[sig.index] += sig.weight * d
    assert maxdiff(auto, expl) < 1e-12


# --------------------------------------------------------------------------------------
# Fast path == reference: the same arithmetic (large beta, unconverged phases)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("nudging", ["symmetric", "one-sided"])
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("kind", KINDS)
def test_fast_ep_equals_reference_ep(kind, which, nudging):
    """States s*, s+, s- to 1e-10 and every gradient (layers, readout, heads, maps) to 1e-9
    relative, at beta = 0.2 and T1 = 7, T2 = 5. Measured over all 20 cases: states equal to
    <= 6e-17, gradients to <= 1.5e-13 relative. The signals matter: without them s+ moves
    elsewhere (by more than 1e-3)."""
    net, x, y, t = make(kind, which, seed=3)
    ref = R.ReferenceNet.from_module(net)
    beta, T1, T2 = 0.2, 7, 5
    net.zero_grad(set_to_none=True)
    res = net.ep_backward(x, y, beta=beta, T1=T1, T2=T2, nudging=nudging, keep_states=True, teacher=t)
    ep = R.ep_gradient(ref, x, y, beta, T1, T2, nudging, teacher=t)
    assert maxdiff(res.states["free"], ep.s_free) < 1e-10
    assert maxdiff(res.states["plus"], ep.s_pos) < 1e-10
    if nudging == "symmetric":
        assert maxdiff(res.states["minus"], ep.s_neg) < 1e-10
    assert maxdiff(ep.s_pos, R.nudged_phase(without_signals(ref), x, y, ep.s_free, beta, T2)) > 1e-3
    g = grads(net)
    assert list(g) == list(ep.grads)
    for name, (cos, rel) in R.cosine_and_relerr(g, ep.grads).items():
        assert float(ep.grads[name].abs().max()) > 0, name
        assert rel < 1e-9, (name, cos, rel)
    assert res.diagnostics["total_cost"] == pytest.approx(float(ep.loss), rel=1e-12)
    assert float(res.loss) == pytest.approx(float(ep.output_loss), rel=1e-12)
    assert res.diagnostics["signal_losses"] == pytest.approx([float(v) for v in ep.signal_losses], rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_random_sign_equals_reference_one_sided(kind):
    """random-sign draws +-beta; either way it is the one-sided estimate at that sign."""
    net, x, y, t = make(kind, "all", seed=4)
    ref = R.ReferenceNet.from_module(net)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        sign = 1 if torch.randint(0, 2, (1,)).item() == 1 else -1  # the engine's draw
        if sign in seen:
            continue
        seen.add(sign)
        torch.manual_seed(seed)
        net.zero_grad(set_to_none=True)
        res = net.ep_backward(x, y, beta=0.2, T1=7, T2=5, nudging="random-sign", keep_states=True, teacher=t)
        ep = R.ep_gradient(ref, x, y, sign * 0.2, 7, 5, "one-sided", teacher=t)
        assert maxdiff(res.states["plus"], ep.s_pos) < 1e-10
        for name, (cos, rel) in R.cosine_and_relerr(grads(net), ep.grads).items():
            assert rel < 1e-9, (sign, name, rel)
        if len(seen) == 2:
            break
    assert seen == {1, -1}


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("kind", KINDS)
def test_fast_bptt_equals_reference_bptt(kind, which):
    """net.bptt_backward(teacher=...) and the reference's BPTT of the same total cost.
    Measured: <= 3.7e-16 relative per tensor over all 10 cases."""
    net, x, y, t = make(kind, which, seed=5)
    ref = R.ReferenceNet.from_module(net)
    net.zero_grad(set_to_none=True)
    res = net.bptt_backward(x, y, T1=7, teacher=t)
    bp = R.bptt_gradient(ref, x, y, 7, teacher=t)
    g = grads(net)
    assert list(g) == list(bp.grads)
    for name, (cos, rel) in R.cosine_and_relerr(g, bp.grads).items():
        assert float(bp.grads[name].abs().max()) > 0, name
        assert rel < 1e-10, (name, rel)
    assert res.diagnostics["total_cost"] == pytest.approx(float(bp.loss), rel=1e-12)
    assert float(res.loss) == pytest.approx(float(bp.output_loss), rel=1e-12)


# --------------------------------------------------------------------------------------
# The bar: EP of the total cost == BPTT of the same cost
# --------------------------------------------------------------------------------------
def switches(ref, x, sa, sb):
    """Regime switches between two states: max-pool winners and clamp boundaries."""
    n = 0
    for i, L in enumerate(ref.layers):
        if L.kind == "conv" and L.pool > 1:
            ia = F.max_pool2d(F.conv2d(([x] + sa)[i], ref.params[L.weight], ref.params[L.bias], L.stride, L.padding),
                              L.pool, return_indices=True)[1]
            ib = F.max_pool2d(F.conv2d(([x] + sb)[i], ref.params[L.weight], ref.params[L.bias], L.stride, L.padding),
                              L.pool, return_indices=True)[1]
            n += int((ia != ib).sum())
        n += int((((sa[i] > 0) & (sa[i] < 1)) != ((sb[i] > 0) & (sb[i] < 1))).sum())
    return n


@pytest.mark.parametrize("kind,seed", [("conv", 1), ("linear", 0)])
def test_ep_of_total_cost_matches_bptt(kind, seed):
    """float64, beta = 1e-3, converged phases (residual < 1e-12), no regime switch between
    s+ and s-: cosine >= 0.9999 and relative error < 1e-4 per tensor, for the fast path and
    the reference alike. Measured (all four signals): residuals <= 6e-17, min cosine
    1 - 1.7e-13 (conv) and 1 - 5.3e-13 (linear); max relative error 6.1e-7 (conv, map weight),
    1.1e-6 (linear, map weight). Without the signals, BPTT's layer gradients differ by 50-110%
    (relative): the signals are most of the gradient checked here."""
    net, x, y, t = make(kind, "all", seed=seed, n=6)
    ref = R.ReferenceNet.from_module(net)
    beta, T1, T2 = 1e-3, 250, 60
    net.zero_grad(set_to_none=True)
    res = net.ep_backward(x, y, beta=beta, T1=T1, T2=T2, keep_states=True, teacher=t)
    g_ep = grads(net)
    assert max(res.diagnostics["free"]["residual"]) < 1e-12
    assert max(res.diagnostics["nudged"]["residual"]) < 1e-12
    ep = R.ep_gradient(ref, x, y, beta, T1, T2, teacher=t)
    assert R.residual(ref, x, ep.s_free) < 1e-12
    assert R.residual(ref, x, ep.s_pos, y, beta, teacher=t) < 1e-12
    assert R.residual(ref, x, ep.s_neg, y, -beta, teacher=t) < 1e-12
    assert switches(ref, x, res.states["plus"], res.states["minus"]) == 0
    bp = R.bptt_gradient(ref, x, y, T1, teacher=t)
    for g in (g_ep, ep.grads):
        for name, (cos, rel) in R.cosine_and_relerr(g, bp.grads).items():
            assert float(bp.grads[name].abs().max()) > 0, name
            assert cos >= 0.9999 and rel < 1e-4, (name, cos, rel)
    # ... and the signals are a real part of that gradient, not a rounding error
    plain = R.bptt_gradient(without_signals(ref), x, y, T1).grads
    assert max(R.cosine_and_relerr(plain, {k: bp.grads[k] for k in plain})[n][1] for n in plain) > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_gdu_with_signals(kind):
    """Gradient-descending updates with the total cost: the per-step EP updates match the
    truncated BPTT contributions to ~beta, and EP's sum telescopes to the one-sided estimate.
    Measured: max_t ||dEP_t - dBPTT_t|| / max_t ||dBPTT_t|| = 0.10 .. 0.86 x beta."""
    net, x, y, t = make(kind, "all", seed=1 if kind == "conv" else 0, n=6)
    ref = R.ReferenceNet.from_module(net)
    beta, T1, T2 = 1e-4, 200, 10
    cur = R.gdu_curves(ref, x, y, beta, T1, T2, teacher=t)
    one = R.ep_gradient(ref, x, y, beta, T1, T2, "one-sided", teacher=t).grads
    for name in ref.layer_param_names:
        ep, bp = cur.ep[name].flatten(1), cur.bptt[name].flatten(1)
        scale = float(bp.norm(dim=1).max())
        assert scale > 0
        assert float((ep - bp).norm(dim=1).max()) / scale < 10 * beta, name
        assert torch.allclose(cur.ep_cum[name][-1], one[name], rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------
# The free phase and inference do not see the signals
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_free_phase_and_inference_unchanged_by_signals(kind):
    net, x, y, t = make(kind, "all", seed=2)
    plain = copy.deepcopy(net)
    plain.signals = nn.ModuleList()
    assert torch.equal(net(x, T1=20), plain(x, T1=20))
    s_a, _ = net.free_phase(x, T1=20)
    s_b, _ = plain.free_phase(x, T1=20)
    assert all(torch.equal(a, b) for a, b in zip(s_a, s_b))
    ra = net.ep_backward(x, y, beta=0.2, T1=20, T2=5, keep_states=True, teacher=t)
    rb = plain.ep_backward(x, y, beta=0.2, T1=20, T2=5, keep_states=True)
    assert all(torch.equal(a, b) for a, b in zip(ra.states["free"], rb.states["free"]))
    assert torch.equal(ra.logits, rb.logits) and torch.equal(ra.loss, rb.loss)
    assert maxdiff(ra.states["plus"], rb.states["plus"]) > 1e-3  # the nudged phase does see them
    # the reference agrees: its free phase ignores the signals
    ref = R.ReferenceNet.from_module(net)
    assert all(torch.equal(a, b) for a, b in zip(R.free_phase(ref, x, 20), R.free_phase(without_signals(ref), x, 20)))


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["feature", "logit_readout", "logit_hidden"])
def test_distillation_without_teacher_is_an_error(which):
    net, x, y, t = make("conv", which)
    ref = R.ReferenceNet.from_module(net)
    with pytest.raises(ValueError, match="teacher"):
        net.ep_backward(x, y, beta=0.1, T1=3, T2=2)
    with pytest.raises(ValueError, match="teacher"):
        net.bptt_backward(x, y, T1=3)
    with pytest.raises(ValueError, match="teacher"):
        R.ep_gradient(ref, x, y, 0.1, 3, 2)
    with pytest.raises(ValueError, match="teacher"):
        R.bptt_gradient(ref, x, y, 3)
    with pytest.raises(ValueError, match="teacher"):
        R.gdu_curves(ref, x, y, 0.1, 3, 2)


def test_classifier_needs_no_teacher():
    net, x, y, _ = make("conv", "classifier")
    net.ep_backward(x, y, beta=0.1, T1=3, T2=2)
    R.ep_gradient(R.ReferenceNet.from_module(net), x, y, 0.1, 3, 2)


def test_teacher_missing_a_layer_is_an_error_naming_it():
    net, x, y, t = make("conv", "all")
    bad = {"features": {0: torch.rand(4, 3, 4, 4, dtype=DT)}, "logits": t["logits"]}  # the signal is at layer 1
    ref = R.ReferenceNet.from_module(net)
    with pytest.raises(ValueError, match="layer 1"):
        net.ep_backward(x, y, beta=0.1, T1=3, T2=2, teacher=bad)
    with pytest.raises(ValueError, match="layer 1"):
        net.bptt_backward(x, y, T1=3, teacher=bad)
    with pytest.raises(ValueError, match="layer 1"):
        R.ep_gradient(ref, x, y, 0.1, 3, 2, teacher=bad)
    with pytest.raises(ValueError, match="layer 1"):
        R.bptt_gradient(ref, x, y, 3, teacher=bad)
    # a teacher without the "features" (or "logits") entry at all
    with pytest.raises(ValueError, match="layer 1"):
        R.ep_gradient(ref, x, y, 0.1, 3, 2, teacher={"logits": t["logits"]})
    with pytest.raises(ValueError, match="logits"):
        R.ep_gradient(ref, x, y, 0.1, 3, 2, teacher={"features": t["features"]})


def test_fast_teacher_without_features_entry_is_a_value_error():
    net, x, y, t = make("conv", "feature")
    with pytest.raises(ValueError, match="layer 1"):
        net.ep_backward(x, y, beta=0.1, T1=3, T2=2, teacher={"logits": t["logits"]})


def test_signal_layer_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="out of range"):
        EPNetwork(EPLinear(6, 4), EPLinear(4, 3), readout=nn.Linear(3, 2), signals=[LocalClassifier(2, 3, 2)])
    with pytest.raises(ValueError, match="out of range"):
        EPNetwork(EPLinear(6, 4), EPLinear(4, 3), readout=nn.Linear(3, 2), signals=[LocalClassifier(-3, 3, 2)])
    layers = [dict(weight=torch.rand(4, 6, dtype=DT)), dict(weight=torch.rand(3, 4, dtype=DT))]
    head = (torch.rand(2, 3, dtype=DT), torch.rand(2, dtype=DT))
    for bad in (2, -3):
        with pytest.raises(ValueError, match="out of range"):
            R.ReferenceNet(layers, readout=head, signals=[dict(kind="classifier", layer=bad, head=head)])
    with pytest.raises(ValueError, match="readout"):
        R.ReferenceNet(layers, signals=[dict(kind="logit", layer="readout")])  # MSE mode: no readout
    with pytest.raises(ValueError, match="kind"):
        R.ReferenceNet(layers, readout=head, signals=[dict(kind="nope", layer=0)])


# --------------------------------------------------------------------------------------
# ep-gradcheck on a network with signals (no distillation: gradcheck passes no teacher)
# --------------------------------------------------------------------------------------
def test_gradcheck_with_local_classifier():
    """Measured: 1 - cosine <= 2.2e-15, relative error <= 6.6e-8 (head: 3.5e-8), no switches."""
    from ep_kernels.gradcheck import gradcheck

    net, x, y, _ = make("conv", "classifier", seed=1, n=6)
    r = gradcheck(net, x, y, beta=1e-3, T1=250, T2=60, dtype=DT, gdu=False)
    assert {"signals.0.head.weight", "signals.0.head.bias"} <= set(r["params"])
    assert max(r["residual"]["free"]) < 1e-12 and max(r["residual"]["nudged"]) < 1e-12
    for name, p in r["params"].items():
        assert p["cosine"] >= 0.9999 and p["relerr"] < 1e-4, (name, p)
