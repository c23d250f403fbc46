"""Each compiled op against its plain-torch reference on the VGG-5 shapes (batch 32, float32).

One pytest-benchmark group per (op, layer); the reference is the group's baseline, so the
report of ``bench/conftest.py`` prints the compiled op's speedup next to it (and writes it to
``bench/results/latest.json``). Layers (docs/design.md, "The ops"):

    l1: 3 -> 128 @ 32x32, pad 1, pool 2      l2: 128 -> 256 @ 16x16, pad 1, pool 2
    l3: 256 -> 512 @ 8x8, pad 1, pool 2      l4: 512 -> 512 @ 4x4, pad 0, pool 2

States are uniform in (0, 1) without exact zeros: the worst case for the sparse kernels, which
skip the zeros that saturated hard-sigmoid states have in real relaxations. Rounds are few
so that a default run stays short; set EP_BENCH_ROUNDS for more, EP_BENCH_THREADS to fix the
thread count (the default is torch's).

Run: ``pytest bench/test_bench_ops.py --benchmark-only``.
"""
import os

import pytest
import torch

import ep_kernels.ops as ops
from ep_kernels import _ext, testing, use_backend

pytestmark = pytest.mark.skipif(not _ext.compiled_available(), reason="compiled extension not built")

ROUNDS = int(os.environ.get("EP_BENCH_ROUNDS", "3"))
if os.environ.get("EP_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["EP_BENCH_THREADS"]))

BATCH = 32
# VGG-5's four layers (the harness's VGG5_CASES) at batch 32
LAYERS = {f"l{i + 1} {c[1]}->{c[2]}@{c[3]}": (BATCH,) + c[1:] for i, c in enumerate(testing.VGG5_CASES)}
IMPLS = ["reference", "cpu"]
_CACHE = {}


def _layer(name):
    """Inputs for every op of one layer (built once per layer): the harness's conv_setup, and
    states uniform in (0, 1) without exact zeros (the sparse kernels' worst case)."""
    if name in _CACHE:
        return _CACHE[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    x_a, w, b, conv, pool, hc = testing.conv_setup(LAYERS[name], torch.float32, g)
    x_b = torch.rand(x_a.shape, generator=g)
    d_a, i_a = ops.conv_pool_drive_ref(x_a, w, b, pool=pool, **conv)
    _, i_b = ops.conv_pool_drive_ref(x_b, w, b, pool=pool, **conv)
    s_a = torch.rand(d_a.shape, generator=g).clamp_min_(1e-3)
    s_b = torch.rand(d_a.shape, generator=g).clamp_min_(1e-3)
    _CACHE[name] = dict(x_a=x_a, x_b=x_b, w=w, b=b, conv=conv, d_a=d_a, i_a=i_a, i_b=i_b, s_a=s_a, s_b=s_b,
                        hw=list(x_a.shape[2:]), hc=hc, td=torch.rand(d_a.shape, generator=g) - 0.5)
    return _CACHE[name]


def _run(benchmark, op, layer, impl, fn):
    benchmark.group = f"op {op} {layer}"
    benchmark.name = f"{op}[{impl}]"
    benchmark.extra_info.update(op=op, layer=layer, impl=impl, baseline=(impl == "reference"))
    with use_backend("reference" if impl == "reference" else "cpu"):
        benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_conv_pool_drive(benchmark, layer, impl):
    d = _layer(layer)
    _run(benchmark, "conv_pool_drive", layer, impl,
         lambda: ops.conv_pool_drive(d["x_a"], d["w"], d["b"], pool=2, **d["conv"]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_pool_conv_transpose(benchmark, layer, impl):
    """The compiled kernel packs the weight on its first call and reuses the packing while the
    weight's bytes are unchanged (the warm-up round makes it), as in a relaxation's steps."""
    d = _layer(layer)
    _run(benchmark, "pool_conv_transpose", layer, impl,
         lambda: ops.pool_conv_transpose(d["s_a"], d["i_a"], d["w"], d["hw"], d["hc"], pool=2, **d["conv"]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", list(LAYERS)[1:])
def test_pool_conv_transpose_relaxed_states(benchmark, layer, impl):
    """The same with 35% exact zeros in s, the fraction measured in VGG-5 states mid-relaxation
    (hard sigmoid saturation): the sparse kernel skips them, the dense reference cannot."""
    d = _layer(layer)
    g = torch.Generator().manual_seed(7)
    s = d["s_a"].masked_fill(torch.rand(d["s_a"].shape, generator=g) < 0.35, 0.0)
    _run(benchmark, "pool_conv_transpose(35% zero states)", layer, impl,
         lambda: ops.pool_conv_transpose(s, d["i_a"], d["w"], d["hw"], d["hc"], pool=2, **d["conv"]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_state_update(benchmark, layer, impl):
    d = _layer(layer)
    out = torch.empty_like(d["d_a"])
    _run(benchmark, "state_update", layer, impl,
         lambda: ops.state_update(d["d_a"], d["td"], None, d["s_a"], 0.5, out))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_contrastive_conv_grad(benchmark, layer, impl):
    d = _layer(layer)
    gw, gb = torch.zeros_like(d["w"]), torch.zeros_like(d["b"])
    c = d["conv"]
    _run(benchmark, "contrastive_conv_grad", layer, impl,
         lambda: ops.contrastive_conv_grad(d["x_a"], d["s_a"], d["i_a"], d["x_b"], d["s_b"], d["i_b"], d["hc"],
                                           c["stride"], c["padding"], c["dilation"], c["groups"], 2, -0.5, gw, gb))


CONV_LAYOUTS = ["nchw", "nhwc with conversions", "nhwc"]


@pytest.mark.parametrize("layout", CONV_LAYOUTS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_conv_layout(benchmark, layer, layout):
    """The channels_last (NHWC) lever of issue 13 on its own: ATen's float32 convolution of each
    layer in NCHW (the baseline, what the drive runs), in NHWC with the input converted in and
    the output back (what the NCHW kernels around it would need), and in NHWC alone (the bound
    for a pipeline whose every kernel is NHWC)."""
    d = _layer(layer)
    c = d["conv"]
    x, w, b = d["x_a"], d["w"], d["b"]
    cl = torch.channels_last
    w_cl, x_cl = w.contiguous(memory_format=cl), x.contiguous(memory_format=cl)
    conv = torch.nn.functional.conv2d
    fns = {
        "nchw": lambda: conv(x, w, b, c["stride"], c["padding"], c["dilation"], c["groups"]),
        "nhwc with conversions": lambda: conv(x.contiguous(memory_format=cl), w_cl, b, c["stride"], c["padding"],
                                              c["dilation"], c["groups"]).contiguous(),
        "nhwc": lambda: conv(x_cl, w_cl, b, c["stride"], c["padding"], c["dilation"], c["groups"]),
    }
    torch.testing.assert_close(fns[layout]().contiguous(), fns["nchw"](), rtol=1e-4, atol=1e-4)
    benchmark.group = f"conv layout {layer}"
    benchmark.name = f"conv[{layout}]"
    benchmark.extra_info.update(op="conv2d", layer=layer, impl=layout, baseline=(layout == "nchw"))
    benchmark.pedantic(fns[layout], rounds=ROUNDS, warmup_rounds=1, iterations=1)
