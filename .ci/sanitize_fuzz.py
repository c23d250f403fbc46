"""Fuzz the compiled CPU ops of a sanitized build (run by .ci/sanitize.sh; issue 11).

    LD_PRELOAD=<libasan.so>:<libubsan.so> python .ci/sanitize_fuzz.py --lib <sanitized .so> [--cases N]

Loads ``--lib`` (csrc/ built with -fsanitize=address,undefined) with ``torch.ops.load_library``,
never ep_kernels' own extension (checked: no other ep_kernels library is mapped, before or
after), and calls the four ops through ``torch.ops.ep_kernels.*``:

1. ``--cases`` random geometries (kernel 1-5, rectangular, stride 1-3, padding 0-3, dilation
   1-3, groups 1-3, pool 1-3, batch 1-3, channels 1-40, convolution outputs divisible by the pool
   and not; float32 / float64 / bfloat16; contiguous and non-contiguous operands), all four ops
   on each, against the plain-torch references ``ep_kernels.ops.*_ref`` with the tolerances of
   ``ep_kernels.testing`` (conv_pool_drive and its argmax exact, state_update bitwise);
2. extreme integers (2**31-1, 2**31, 2**62, 2**63-1, 2**63, -1, 0, -2**63) in place of every
   geometry argument (stride, padding, dilation, groups, pool, conv_out_size, input_size; both
   entries of a pair, or one) of a valid call: refused with ValueError/TypeError/RuntimeError,
   or, where the value is legal, the reference's result;
3. crafted index tensors (outside their window, in the plane's rows/columns no window covers,
   outside the plane, negative, int64 min/max, at positions whose state is 0, in idx_a or
   idx_b; float32, float64, bfloat16): refused with ValueError by pool_conv_transpose and
   contrastive_conv_grad, which leaves grad_weight and grad_bias untouched;
4. huge but legal geometries (stride, padding, dilation up to 2**31-1 with a small convolution
   output): the three convolution ops against an exact reference computed here with Python
   integers (itself checked against the ops' references on small geometries); an op may refuse
   one with a ValueError (an explicit limit, counted apart), not otherwise.

A sanitizer report ends the process (ASan exit 86, UBSan 87, from .ci/sanitize.sh's options);
the case running then is in ``--trace``'s file. A mismatch or a wrong refusal is printed with its
case and the script exits 1 at the end. Every case draws from its own generator, seeded by (seed,
ISA path, part, case number): ``--isa P --seed S --first I --cases 1`` (with EP_KERNELS_ISA set
to match) reruns random geometry I alone, and ``--cases 0 --crafted 0 --huge I+1`` the huge
geometries up to I.
"""
import argparse
import math
import os
import random
import sys
import time
import traceback

import torch

OK_ERRORS = (ValueError, TypeError, RuntimeError)
EXTREMES = [2 ** 31 - 1, 2 ** 31, 2 ** 62, 2 ** 63 - 1, 2 ** 63, -1, 0, -2 ** 63]
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
ISA_SALT = {"native": 0, "avx2": 1, "generic": 2}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lib", required=True, help="the sanitized library (csrc/ep_kernels.cpp + csrc/cpu/*.cpp)")
    p.add_argument("--isa", default="native", choices=sorted(ISA_SALT), help="label of the ISA path (EP_KERNELS_ISA)")
    p.add_argument("--cases", type=int, default=250, help="random geometries (each runs the four ops)")
    p.add_argument("--first", type=int, default=0, help="number of the first random geometry (to reproduce one)")
    p.add_argument("--huge", type=int, default=None, help="huge legal geometries (default: cases // 2)")
    p.add_argument("--crafted", type=int, default=None,
                   help="geometries for crafted indices, ~225 refusals each (default: cases // 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", default=None, help="file holding the case now running (read after a sanitizer abort)")
    p.add_argument("--max-failures", type=int, default=20)
    return p.parse_args()


# -- loading the sanitized library, and only it ------------------------------------------------

def mapped_ep_libraries(lib):
    """ep_kernels' libraries mapped into this process: ``lib`` (the sanitized one) and any build of
    ep_kernels' own extension (ep_kernels/_C*.so ahead of time, <cache>/_C-torch.../_C.so on first use)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "/" in line}

    def ours(p):
        parent = os.path.basename(os.path.dirname(p))
        return p == lib or os.path.basename(p).startswith("_C") and (parent == "ep_kernels" or parent.startswith("_C-"))

    return sorted(p for p in paths if ours(p))


def load(lib):
    lib = os.path.abspath(lib)
    before = mapped_ep_libraries(lib)
    assert not before, f"an ep_kernels library was loaded before the sanitized one: {before}"
    torch.ops.load_library(lib)
    assert mapped_ep_libraries(lib) == [lib], mapped_ep_libraries(lib)
    maps = open("/proc/self/maps").read()
    assert "libasan" in maps and "libubsan" in maps, "run with the ASan and UBSan runtimes preloaded (LD_PRELOAD)"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ep_kernels import _ext

    # Any use of ep_kernels' own loader (a wrapper asking for the 'cpu' backend) would load _C
    # into this process: make it fail loudly instead. Everything here calls torch.ops directly.
    _ext._LOAD_ERROR = "sanitize_fuzz: the sanitized library is loaded; ep_kernels' own extension must not be"
    import ep_kernels.ops  # noqa: F401  (registers the fake kernels: the ops exist now)
    return lib


class Trace:
    """The case now running, in a file (overwritten per case) for the shell to show after an abort."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if path else None

    def __call__(self, text):
        if self.fd is not None:
            data = text.encode()
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)


# -- inputs ------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def lay(t, kind):
    """``t``'s values in layout ``kind`` (ep_kernels.testing.noncontiguous); a shape that cannot
    be non-contiguous that way (size-1 trailing dims) takes the other way, or stays contiguous."""
    from ep_kernels.testing import noncontiguous

    for k in (kind, "strided", "transposed"):
        try:
            return noncontiguous(t, k)
        except AssertionError:
            continue
    return t


def sample_axis(r, k, s, p, d, pool, divisible):
    """An input size h giving a convolution output hc >= pool, divisible by the pool or not."""
    if pool == 1 or divisible:
        hc = pool * r.randint(1, 4)
    else:
        hc = pool * r.randint(1, 4) + r.randint(1, pool - 1)
    h = (hc - 1) * s + d * (k - 1) + 1 - 2 * p + r.randint(0, s - 1)
    return h, hc


def sample_geometry(r):
    """A random legal geometry (dict), its convolution output (hc, wc) >= pool."""
    while True:
        kh = r.randint(1, 5)
        kw = kh if r.random() < 0.4 else r.randint(1, 5)
        two = lambda lo, hi: [r.randint(lo, hi)] * 2 if r.random() < 0.5 else [r.randint(lo, hi), r.randint(lo, hi)]  # noqa: E731
        stride, padding, dilation = two(1, 3), two(0, 3), two(1, 3)
        groups, pool = r.randint(1, 3), r.randint(1, 3)
        divisible = r.random() < 0.5
        h, hc = sample_axis(r, kh, stride[0], padding[0], dilation[0], pool, divisible)
        w, wc = sample_axis(r, kw, stride[1], padding[1], dilation[1], pool, divisible or r.random() < 0.3)
        if h < 1 or w < 1:
            continue
        from ep_kernels.ops import conv_out_size

        assert conv_out_size([h, w], [kh, kw], stride, padding, dilation) == [hc, wc]
        return dict(n=r.randint(1, 3), cin=groups * r.randint(1, 40 // groups), cout=groups * r.randint(1, 40 // groups),
                    h=h, w=w, k=[kh, kw], stride=stride, padding=padding, dilation=dilation, groups=groups, pool=pool,
                    hc=hc, wc=wc, dtype=r.choice(DTYPES), layout=r.choice(["contiguous", "transposed", "strided"]),
                    bias=r.random() < 0.7)


def describe(g):
    keys = ("n", "cin", "cout", "h", "w", "k", "stride", "padding", "dilation", "groups", "pool", "hc", "wc", "dtype",
            "layout", "bias")
    return ", ".join(f"{k}={g[k]}" for k in keys if k in g)


def tensors(g, gen):
    from ep_kernels.testing import rand

    dt = g["dtype"]
    x = rand(gen, g["n"], g["cin"], g["h"], g["w"], dtype=dt)
    fan = g["cin"] // g["groups"] * g["k"][0] * g["k"][1]
    weight = rand(gen, g["cout"], g["cin"] // g["groups"], *g["k"], dtype=dt, lo=-1, hi=1) / math.sqrt(fan)
    bias = rand(gen, g["cout"], dtype=dt, lo=-0.2, hi=0.2) if g["bias"] else None
    return x, weight, bias


def conv_args(g):
    return g["stride"], g["padding"], g["dilation"], g["groups"], g["pool"]


# -- 1. random geometries against the references -----------------------------------------------

def check_drive(g, gen):
    from ep_kernels.ops import conv_pool_drive_ref
    from ep_kernels.testing import RTOL

    x, weight, bias = tensors(g, gen)
    x, weight = lay(x, g["layout"]), lay(weight, g["layout"])
    d, i = torch.ops.ep_kernels.conv_pool_drive(x, weight, bias, *conv_args(g))
    rd, ri = conv_pool_drive_ref(x, weight, bias, *conv_args(g))
    assert d.shape == rd.shape and d.dtype == rd.dtype and d.is_contiguous(), (d.shape, rd.shape, d.dtype)
    torch.testing.assert_close(d, rd, rtol=RTOL[g["dtype"]], atol=0)
    assert i.dtype == torch.int64 and i.shape == ri.shape, (i.dtype, i.shape, ri.shape)
    assert torch.equal(i, ri), f"{int((i != ri).sum())} of {i.numel()} argmax positions differ"
    return d, i


def states(g, gen, idx_from=None):
    """A state (N, C_out, Hc // pool, Wc // pool) with exact zeros, and window indices."""
    from ep_kernels.testing import random_state, random_window_indices

    pool = g["pool"]
    shape = (g["n"], g["cout"], g["hc"] // pool, g["wc"] // pool)
    s = random_state(gen, shape, g["dtype"])
    if pool == 1:
        idx = torch.empty(0, dtype=torch.int64)
    elif idx_from is not None and torch.rand((), generator=gen) < 0.5:
        idx = idx_from.clone()
    else:
        idx = random_window_indices(gen, g["n"], g["cout"], g["hc"], g["wc"], pool)
    return s, idx


def wide(t):
    return t.double() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t


def check_top_down(g, gen, idx_from=None):
    from ep_kernels.ops import pool_conv_transpose_ref
    from ep_kernels.testing import RTOL, assert_close_scaled

    _, weight, _ = tensors(g, gen)
    s, idx = states(g, gen, idx_from)
    s, weight = lay(s, g["layout"]), lay(weight, g["layout"])
    if g["pool"] > 1:
        idx = lay(idx, g["layout"])
    args = ([g["h"], g["w"]], [g["hc"], g["wc"]], *conv_args(g))
    out = torch.ops.ep_kernels.pool_conv_transpose(s, idx, weight, *args)
    ref = pool_conv_transpose_ref(wide(s), idx, wide(weight), *args)
    scale = pool_conv_transpose_ref(wide(s).abs(), idx, wide(weight).abs(), *args)
    assert out.is_contiguous() and out.dtype == g["dtype"] and out.shape == ref.shape, (out.shape, out.dtype)
    assert_close_scaled(wide(out), ref, scale, RTOL[g["dtype"]])


def check_update(g, gen, shape):
    from ep_kernels.ops import state_update_ref
    from ep_kernels.testing import rand

    dt, r = g["dtype"], random.Random(int(torch.randint(0, 2 ** 31, (), generator=gen)))
    drive = rand(gen, *shape, dtype=dt, lo=-1.0, hi=4.0)
    td = rand(gen, *shape, dtype=dt, lo=-1, hi=1) if r.random() < 0.7 else None
    nudge = rand(gen, *shape, dtype=dt, lo=-0.5, hi=0.5) if r.random() < 0.5 else None
    prev = rand(gen, *shape, dtype=dt) if r.random() < 0.8 else None
    gain = r.choice([1.0, 0.5, r.uniform(0.1, 2.0)])
    drive, td, nudge, prev = (None if t is None else lay(t, r.choice(["contiguous", "transposed", "strided"]))
                              for t in (drive, td, nudge, prev))
    where = r.choice(["own", "own", "drive"] + (["top_down"] if td is not None else []))
    if where == "drive":
        out = drive
    elif where == "top_down":
        out = td
    else:
        out = lay(torch.zeros(shape, dtype=dt), r.choice(["contiguous", "transposed", "strided"]))
    operands = [None if t is None else t.clone() for t in (drive, td, nudge, prev)]  # before an in-place update
    ch = torch.ops.ep_kernels.state_update(drive, td, nudge, prev, gain, out)
    if dt == torch.bfloat16:  # the float32 computation rounded once (ep_kernels.testing.check_state_update)
        f32 = [None if t is None else t.float() for t in operands]
        out32 = torch.empty(shape)
        state_update_ref(*f32, gain, out32)
        out_ref = out32.to(dt)
        ch_ref = (out_ref.float() - operands[3].float()).abs().max().to(dt) if prev is not None else ch.new_empty(0)
    else:
        out_ref = torch.empty(shape, dtype=dt)
        ch_ref = state_update_ref(*operands, gain, out_ref)
    assert torch.equal(out, out_ref), f"state differs from the reference (out={where})"
    assert ch.shape == ch_ref.shape and ch.dtype == ch_ref.dtype and torch.equal(ch, ch_ref), (ch, ch_ref)


def check_contrastive(g, gen, idx_from=None):
    from ep_kernels.ops import contrastive_conv_grad_ref
    from ep_kernels.testing import RTOL, assert_close_scaled, rand

    dt, pool, lo = g["dtype"], g["pool"], g["layout"]
    x_a, weight, _ = tensors(g, gen)
    same_x = torch.rand((), generator=gen) < 0.3
    x_b = x_a if same_x else rand(gen, *x_a.shape, dtype=dt)
    s_a, i_a = states(g, gen, idx_from)
    s_b, i_b = states(g, gen)
    x_a, s_a, s_b = lay(x_a, lo), lay(s_a, lo), lay(s_b, lo)
    x_b = x_a if same_x else lay(x_b, lo)
    if pool > 1:
        i_a, i_b = lay(i_a, lo), lay(i_b, lo)
    scale = float(torch.empty(()).uniform_(-2, 2, generator=gen))
    gw0 = rand(gen, *weight.shape, dtype=dt, lo=-1, hi=1)
    gb0 = rand(gen, g["cout"], dtype=dt, lo=-1, hi=1) if g["bias"] else None
    gw = lay(gw0.clone(), lo)
    gb = None if gb0 is None else gb0.clone()
    args = (x_a, s_a, i_a, x_b, s_b, i_b, [g["hc"], g["wc"]], g["stride"], g["padding"], g["dilation"], g["groups"],
            pool, scale)
    torch.ops.ep_kernels.contrastive_conv_grad(*args, gw, gb)
    wargs = tuple(wide(a) for a in args)
    gw_ref, gb_ref = wide(gw0.clone()), None if gb0 is None else wide(gb0.clone())
    contrastive_conv_grad_ref(*wargs, gw_ref, gb_ref)
    absg = torch.zeros_like(gw_ref)  # both weight-gradients on absolute values (ep_kernels.testing)
    conv = dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"], groups=g["groups"])
    for xx, ss, ii in ((wargs[0], wargs[1], i_a), (wargs[3], wargs[4], i_b)):
        u = torch.nn.functional.max_unpool2d(ss, ii, pool, pool, output_size=[g["hc"], g["wc"]]) if pool > 1 else ss
        absg += torch.nn.grad.conv2d_weight(xx.abs(), weight.shape, u.abs(), **conv)
    assert_close_scaled(wide(gw), gw_ref, abs(scale) * absg + wide(gw0).abs(), RTOL[dt])
    if gb is not None:
        babs = (wargs[1].abs().sum((0, 2, 3)) + wargs[4].abs().sum((0, 2, 3))) * abs(scale) + wide(gb0).abs()
        assert_close_scaled(wide(gb), gb_ref, babs, RTOL[dt])


def random_case(g, gen):
    d, i = check_drive(g, gen)
    check_top_down(g, gen, i if g["pool"] > 1 else None)
    check_update(g, gen, tuple(d.shape))
    check_contrastive(g, gen, i if g["pool"] > 1 else None)


# -- 2. extreme integers in place of each geometry argument ------------------------------------

BASES = [
    # small valid calls: pooled (2 and 3, one with a 1x1 kernel) and unpooled (groups, dilation)
    dict(n=2, cin=3, cout=4, h=9, w=11, k=[3, 3], stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, pool=2),
    dict(n=1, cin=4, cout=6, h=7, w=6, k=[3, 2], stride=[1, 2], padding=[0, 1], dilation=[2, 1], groups=2, pool=1),
    dict(n=2, cin=2, cout=3, h=10, w=9, k=[1, 1], stride=[2, 1], padding=[0, 0], dilation=[1, 1], groups=1, pool=3),
]


def base_tensors(b, gen):
    from ep_kernels.ops import conv_out_size
    from ep_kernels.testing import random_window_indices

    g = dict(b, dtype=torch.float32, layout="contiguous", bias=True)
    g["hc"], g["wc"] = conv_out_size([b["h"], b["w"]], b["k"], b["stride"], b["padding"], b["dilation"])
    x, weight, bias = tensors(g, gen)
    s, _ = states(g, gen)
    idx = (random_window_indices(gen, g["n"], g["cout"], g["hc"], g["wc"], g["pool"]) if g["pool"] > 1
           else torch.empty(0, dtype=torch.int64))
    return g, dict(x=x, weight=weight, bias=bias, s=s, idx=idx)


def extreme_calls(g, t):
    """(op, its reference, description, arguments with one geometry integer replaced) for every
    op, geometry argument, pair entry (both, first, second) and extreme value."""
    from ep_kernels import ops

    geo = dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"], groups=g["groups"], pool=g["pool"],
               conv_out_size=[g["hc"], g["wc"]], input_size=[g["h"], g["w"]])
    gw = torch.zeros_like(t["weight"])
    layouts = {
        "conv_pool_drive": (ops.conv_pool_drive_ref, lambda a: [t["x"], t["weight"], t["bias"], a["stride"], a["padding"],
                                                                 a["dilation"], a["groups"], a["pool"]],
                            ("stride", "padding", "dilation", "groups", "pool")),
        "pool_conv_transpose": (ops.pool_conv_transpose_ref,
                                lambda a: [t["s"], t["idx"], t["weight"], a["input_size"], a["conv_out_size"],
                                           a["stride"], a["padding"], a["dilation"], a["groups"], a["pool"]],
                                ("stride", "padding", "dilation", "groups", "pool", "conv_out_size", "input_size")),
        "contrastive_conv_grad": (ops.contrastive_conv_grad_ref,
                                  lambda a: [t["x"], t["s"], t["idx"], t["x"].flip(0), t["s"].flip(0), t["idx"].flip(0),
                                             a["conv_out_size"], a["stride"], a["padding"], a["dilation"], a["groups"],
                                             a["pool"], -0.5, gw, None],
                                  ("stride", "padding", "dilation", "groups", "pool", "conv_out_size")),
    }
    for op, (ref, build, names) in layouts.items():
        for name in names:
            for v in EXTREMES:
                variants = [v] if isinstance(geo[name], int) else [[v, v], [v, geo[name][1]], [geo[name][0], v]]
                for new in variants:
                    a = dict(geo, **{name: new})
                    yield op, ref, f"{op}({name}={new}) on {describe(g)}", build(a)


def run_extreme(op, ref, args):
    """Refused (ValueError/TypeError/RuntimeError), or accepted with the reference's result."""
    is_grad = op == "contrastive_conv_grad"
    if is_grad:
        gw = args[13]
        gw0 = gw.clone()
    try:
        out = getattr(torch.ops.ep_kernels, op)(*args)
    except OK_ERRORS:
        if is_grad:
            assert torch.equal(args[13], gw0), "refused, but grad_weight was changed"
        return "refused"
    # Accepted: every value was legal. The reference must agree (it may itself refuse or fail
    # to allocate a result that large: then only the shape and finiteness are checked).
    if is_grad:
        got = args[13].clone()
        args = list(args)
        args[13] = gw0.clone()
        ref_args, ref_out = args, args[13]
    else:
        got, ref_args = out, args
    try:
        want = ref(*ref_args)
        if is_grad:
            want = ref_out
    except OK_ERRORS:
        want = None
    pair = isinstance(got, tuple)
    gots, wants = (got, want) if pair else ((got,), None if want is None else (want,))
    for j, gt in enumerate(gots):
        if gt.is_floating_point():
            assert torch.isfinite(gt).all(), "accepted, with non-finite results"
        if wants is not None:
            assert gt.shape == wants[j].shape, (gt.shape, wants[j].shape)
            if gt.is_floating_point():
                torch.testing.assert_close(gt, wants[j], rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(gt, wants[j]), "accepted, with other argmax positions than the reference"
    return "accepted" if want is not None else "accepted (reference unavailable)"


# -- 3. crafted index tensors ------------------------------------------------------------------

def crafted_values(r, g, ph, pw, own):
    """(kind, index value) for the window at (ph, pw) whose valid winner is ``own``."""
    k, hc, wc = g["pool"], g["hc"], g["wc"]
    hp, wp = hc // k, wc // k
    plane = hc * wc
    out = []
    # a plane position in another window (a neighbour, or far away)
    oy, ox = (ph + r.choice([-1, 1])) % hp, (pw + r.choice([-1, 1])) % wp
    if (oy, ox) != (ph, pw):
        out.append(("other window", (oy * k + r.randrange(k)) * wc + ox * k + r.randrange(k)))
    # the same row of the plane, one column past the window (or before it)
    col = pw * k + (k if r.random() < 0.5 else -1)
    if 0 <= col < wc:
        out.append(("next to the window", (ph * k + r.randrange(k)) * wc + col))
    # rows or columns that no window covers (a size not divisible by the pool)
    if hc % k:
        out.append(("uncovered row", (hp * k + r.randrange(hc % k)) * wc + r.randrange(wc)))
    if wc % k:
        out.append(("uncovered column", r.randrange(hc) * wc + wp * k + r.randrange(wc % k)))
    out += [("plane size", plane), ("past the plane", plane + r.randrange(1, 4 * plane + 2)),
            ("own + plane", own + plane), ("-1", -1), ("negative", -r.randrange(2, 2 ** 40)),
            ("int64 min", INT64_MIN), ("int64 max", INT64_MAX), ("own - plane", own - plane),
            ("2**31 + own", 2 ** 31 + own), ("2**32 + own", 2 ** 32 + own)]
    return out


def crafted_geometries(r):
    while True:
        g = sample_geometry(r)
        if g["pool"] > 1:
            g["n"], g["cin"], g["cout"] = g["n"], min(g["cin"], 3 * g["groups"]), min(g["cout"], 3 * g["groups"])
            return g


def crafted_case(g, gen, r, record):
    """Every crafted index at a random position (and at one whose state is 0) of idx (top-down),
    idx_a and idx_b (contrastive update), in each dtype: all refused with ValueError."""
    from ep_kernels.testing import random_window_indices

    for dt in DTYPES:
        gd = dict(g, dtype=dt)
        x, weight, bias = tensors(gd, gen)
        s_good, idx_good = states(gd, gen)
        s_good = s_good.contiguous()
        idx_good = random_window_indices(gen, g["n"], g["cout"], g["hc"], g["wc"], g["pool"])
        n, c, hp, wp = idx_good.shape
        for zero_state in (False, True):
            e = r.randrange(idx_good.numel())
            pos = (e // (c * hp * wp), (e // (hp * wp)) % c, (e // wp) % hp, e % wp)
            s = s_good.clone()
            s[pos] = 0.0 if zero_state else 0.75
            for kind, value in crafted_values(r, g, pos[2], pos[3], int(idx_good[pos])):
                idx = idx_good.clone()
                idx[pos] = value
                layout = r.choice(["contiguous", "transposed", "strided"])
                what = (f"{kind} ({value}) at {list(pos)}{' where the state is 0' if zero_state else ''}, "
                        f"{layout} indices, on {describe(gd)}")
                record("pool_conv_transpose(indices: " + what, lambda: refused_top_down(gd, s, lay(idx, layout),
                                                                                           weight))
                for which in ("idx_a", "idx_b"):
                    record(f"contrastive_conv_grad({which}: " + what,
                           lambda: refused_update(gd, x, s, idx_good, lay(idx, layout), which, bias is not None))


def expect_index_error(fn):
    try:
        fn()
    except ValueError as e:
        assert "outside" in str(e), f"refused with an unexpected message: {e}"
        return
    except (TypeError, RuntimeError) as e:
        raise AssertionError(f"refused with {type(e).__name__} instead of ValueError: {e}") from e
    raise AssertionError("accepted an index outside its pooling window")


def refused_top_down(g, s, idx, weight):
    expect_index_error(lambda: torch.ops.ep_kernels.pool_conv_transpose(
        s, idx, weight, [g["h"], g["w"]], [g["hc"], g["wc"]], *conv_args(g)))


def refused_update(g, x, s, idx_good, idx_bad, which, with_bias):
    gw0 = torch.rand(g["cout"], g["cin"] // g["groups"], *g["k"]).to(g["dtype"])
    gb0 = torch.rand(g["cout"]).to(g["dtype"]) if with_bias else None
    gw, gb = gw0.clone(), None if gb0 is None else gb0.clone()
    i_a, i_b = (idx_bad, idx_good) if which == "idx_a" else (idx_good, idx_bad)
    expect_index_error(lambda: torch.ops.ep_kernels.contrastive_conv_grad(
        x, s, i_a, x, s.flip(0), i_b, [g["hc"], g["wc"]], *conv_args(g), -0.5, gw, gb))
    assert torch.equal(gw, gw0), "refused, but grad_weight was changed"
    assert gb is None or torch.equal(gb, gb0), "refused, but grad_bias was changed"


# -- 4. huge but legal geometries, against an exact reference ----------------------------------

HUGE = [2 ** 30, 2 ** 31 - 2, 2 ** 31 - 1]


def huge_axes(r, pool):
    """(k, stride, padding, dilation, h, hc) along one axis: legal, at least one of stride,
    padding, dilation >= 2**30, and a convolution output of pool to 6."""
    while True:
        k = r.randint(1, 3)
        s = r.choice([1, 2, 3] + HUGE)
        p = r.choice([0, 1] + HUGE)
        d = r.choice([1, 2] + HUGE)
        if max(s, p, d) < 2 ** 30 and r.random() < 0.9:
            continue
        h = r.randint(1, 7)
        hc = (h + 2 * p - d * (k - 1) - 1) // s + 1
        if pool <= hc <= 6:
            return k, s, p, d, h, hc


def sample_huge(r):
    pool = r.choice([1, 2])
    groups = r.choice([1, 2])
    (kh, sy, py, dy, h, hc), (kw, sx, px, dx, w, wc) = huge_axes(r, pool), huge_axes(r, pool)
    return dict(n=r.randint(1, 2), cin=groups * r.randint(1, 3), cout=groups * r.randint(1, 3), h=h, w=w, k=[kh, kw],
                stride=[sy, sx], padding=[py, px], dilation=[dy, dx], groups=groups, pool=pool, hc=hc, wc=wc,
                dtype=r.choice([torch.float32, torch.float64]), layout="contiguous", bias=r.random() < 0.5)


def pixel_map(g):
    """[o][tap] -> input pixel (flat), or h * w (outside the input: the zero padding), computed
    with Python integers (exact for any size)."""
    (kh, kw), (sy, sx), (py, px), (dy, dx) = g["k"], g["stride"], g["padding"], g["dilation"]
    h, w = g["h"], g["w"]
    rows = []
    for oy in range(g["hc"]):
        for ox in range(g["wc"]):
            row = []
            for ky in range(kh):
                for kx in range(kw):
                    iy, ix = oy * sy - py + ky * dy, ox * sx - px + kx * dx
                    row.append(iy * w + ix if 0 <= iy < h and 0 <= ix < w else h * w)
            rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)  # (hc * wc, taps)


def exact_columns(x, pix):
    """im2col: (N, C_in, hc * wc, taps), zeros where a tap reads the padding."""
    flat = torch.cat([x.flatten(2), x.new_zeros(x.shape[0], x.shape[1], 1)], dim=2)
    return flat[:, :, pix]


def grouped(t, groups):
    return t.unflatten(1, (groups, t.shape[1] // groups))


def exact_drive(g, x, weight, bias):
    pix = pixel_map(g)
    cols = grouped(exact_columns(x.double(), pix), g["groups"])          # (N, G, cig, O, T)
    w = grouped(weight.double().flatten(2).unsqueeze(0), g["groups"])[0]  # (G, cog, cig, T)
    y = torch.einsum("ngiot,gcit->ngco", cols, w).flatten(1, 2).unflatten(2, (g["hc"], g["wc"]))
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    if g["pool"] == 1:
        return y, torch.empty(0, dtype=torch.int64)
    return torch.nn.functional.max_pool2d(y, g["pool"], g["pool"], return_indices=True)


def unpooled(g, s, idx):
    s = s.double()
    if g["pool"] == 1:
        return s.flatten(2)
    return torch.nn.functional.max_unpool2d(s, idx, g["pool"], g["pool"], output_size=[g["hc"], g["wc"]]).flatten(2)


def exact_top_down(g, s, idx, weight):
    pix = pixel_map(g)
    u = grouped(unpooled(g, s, idx), g["groups"])                         # (N, G, cog, O)
    w = grouped(weight.double().flatten(2).unsqueeze(0), g["groups"])[0]  # (G, cog, cig, T)
    contrib = torch.einsum("ngco,gcit->ngiot", u, w).flatten(1, 2)        # (N, C_in, O, T)
    n, c_in = contrib.shape[:2]
    out = torch.zeros(n, c_in, g["h"] * g["w"] + 1, dtype=torch.float64)
    out.index_add_(2, pix.flatten(), contrib.flatten(2))
    return out[:, :, :-1].unflatten(2, (g["h"], g["w"]))


def exact_weight_grad(g, x, s, idx):
    cols = grouped(exact_columns(x.double(), pixel_map(g)), g["groups"])  # (N, G, cig, O, T)
    u = grouped(unpooled(g, s, idx), g["groups"])                         # (N, G, cog, O)
    gw = torch.einsum("ngco,ngiot->gcit", u, cols)
    return gw.flatten(0, 1).unflatten(2, tuple(g["k"]))


def huge_case(g, gen):
    """The three convolution ops on a huge legal geometry against the exact reference. An op may
    refuse it with a ValueError (an explicit limit; counted apart), never otherwise."""
    x, weight, bias = tensors(g, gen)
    tol = dict(rtol=1e-5, atol=1e-5) if g["dtype"] == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    s, idx = states(g, gen)
    s_b, idx_b = states(g, gen)
    refused = []

    def drive():
        d, i = torch.ops.ep_kernels.conv_pool_drive(x, weight, bias, *conv_args(g))
        ed, ei = exact_drive(g, x, weight, bias)
        torch.testing.assert_close(d.double(), ed, **tol)
        if g["pool"] > 1:
            assert torch.equal(i, ei), "argmax positions differ from the exact reference"

    def top_down():
        top = torch.ops.ep_kernels.pool_conv_transpose(s, idx, weight, [g["h"], g["w"]], [g["hc"], g["wc"]],
                                                       *conv_args(g))
        torch.testing.assert_close(top.double(), exact_top_down(g, s, idx, weight), **tol)

    def update():
        gw = torch.zeros_like(weight)
        torch.ops.ep_kernels.contrastive_conv_grad(x, s, idx, x, s_b, idx_b, [g["hc"], g["wc"]], *conv_args(g), 1.0,
                                                   gw, None)
        want = exact_weight_grad(g, x, s, idx) - exact_weight_grad(g, x, s_b, idx_b)
        torch.testing.assert_close(gw.double(), want, **tol)

    for name, fn in (("conv_pool_drive", drive), ("pool_conv_transpose", top_down), ("contrastive_conv_grad", update)):
        try:
            fn()
        except ValueError as e:
            refused.append(f"{name}: {e}")
        except Exception as e:
            raise AssertionError(f"{name}: {type(e).__name__}: {e}") from e
    if refused:
        print(f"    huge geometry refused with ValueError: {'; '.join(refused)}", flush=True)
        return "some op refused with ValueError"
    return None


def check_exact_reference(gen, r):
    """The exact reference itself against the ops' references on small random geometries."""
    from ep_kernels import ops

    for _ in range(5):
        g = dict(sample_geometry(r), dtype=torch.float64, layout="contiguous")
        x, weight, bias = tensors(g, gen)
        rd, ri = ops.conv_pool_drive_ref(x, weight, bias, *conv_args(g))
        ed, ei = exact_drive(g, x, weight, bias)
        torch.testing.assert_close(ed, rd)
        s, idx = states(g, gen)
        top = ops.pool_conv_transpose_ref(s, idx, weight, [g["h"], g["w"]], [g["hc"], g["wc"]], *conv_args(g))
        torch.testing.assert_close(exact_top_down(g, s, idx, weight), top)
        gw = torch.zeros_like(weight)  # dPhi/dW(x, s) - dPhi/dW(x, 0)
        ops.contrastive_conv_grad_ref(x, s, idx, x, torch.zeros_like(s), idx, [g["hc"], g["wc"]], *conv_args(g), 1.0,
                                      gw, None)
        torch.testing.assert_close(exact_weight_grad(g, x, s, idx), gw)


# -- the run -----------------------------------------------------------------------------------

class Runner:
    def __init__(self, args):
        self.args, self.trace = args, Trace(args.trace)
        self.failures, self.counts = [], {}

    def case(self, part, text, fn):
        self.trace(f"[{self.args.isa}] {part}: {text}\n")
        try:
            result = fn()
        except Exception as e:  # a mismatch (AssertionError) or an unexpected refusal
            self.failures.append(f"[{self.args.isa}] {part}: {text}\n    {type(e).__name__}: {e}\n"
                                 + "".join("    " + line for line in traceback.format_exc().splitlines(True)[-6:]))
            print(self.failures[-1], file=sys.stderr, flush=True)
            result = "FAILED"
        key = f"{part}: {result}" if isinstance(result, str) else part
        self.counts[key] = self.counts.get(key, 0) + 1
        if len(self.failures) >= self.args.max_failures:
            self.finish()

    def seed(self, part, i):
        return ((self.args.seed * 10 + ISA_SALT[self.args.isa]) * 10 + part) * 1_000_003 + i

    def run(self):
        a, t0 = self.args, time.time()
        # 1. random geometries
        stats = {"pool divides": 0, "pool does not divide": 0}
        for i in range(a.first, a.first + a.cases):
            r = random.Random(self.seed(1, i))
            g = sample_geometry(r)
            gen = torch.Generator().manual_seed(self.seed(1, i))
            if g["pool"] > 1:
                stats["pool divides" if g["hc"] % g["pool"] == 0 and g["wc"] % g["pool"] == 0
                      else "pool does not divide"] += 1
            self.case("random", f"case {i} (--isa {a.isa} --seed {a.seed} --first {i} --cases 1): {describe(g)}",
                      lambda: random_case(g, gen))
        t1 = self.done("random geometries (the four ops each)", t0, stats)
        # 2. extreme integers
        gen = torch.Generator().manual_seed(self.seed(2, 0))
        for b in BASES:
            g, t = base_tensors(b, gen)
            for op, ref, text, call in extreme_calls(g, t):
                self.case("extreme", text, lambda: run_extreme(op, ref, call))
        t2 = self.done("extreme integers", t1)
        # 3. crafted index tensors
        for i in range(a.cases // 10 if a.crafted is None else a.crafted):
            r = random.Random(self.seed(4, i))
            g = crafted_geometries(r)
            gen = torch.Generator().manual_seed(self.seed(4, i))
            crafted_case(g, gen, r, lambda text, fn: self.case("crafted", text, fn))
        t3 = self.done("crafted indices", t2)
        # 4. huge legal geometries (last: a sanitizer abort there leaves the other parts done)
        r = random.Random(self.seed(3, 0))
        self.case("exact reference", "self-check against the ops' references",
                  lambda: check_exact_reference(torch.Generator().manual_seed(self.seed(3, 1)), r))
        for i in range(a.cases // 2 if a.huge is None else a.huge):
            g = sample_huge(random.Random(self.seed(3, 10 + i)))
            gen = torch.Generator().manual_seed(self.seed(3, 10 + i))
            self.case("huge", f"case {i}: {describe(g)}", lambda: huge_case(g, gen))
        self.done("huge geometries", t3)
        self.finish()

    def done(self, part, t, extra=None):
        """One line per finished part (a sanitizer abort later leaves these in the log)."""
        now = time.time()
        n = {k: v for k, v in self.counts.items() if k.startswith(part.split()[0])}
        print(f"sanitize_fuzz [{self.args.isa}, EP_KERNELS_ISA={os.environ.get('EP_KERNELS_ISA', '(unset)')}]: "
              f"{part} done in {now - t:.0f} s: {n}" + (f" {extra}" if extra else ""), flush=True)
        return now

    def finish(self):
        lib = os.path.abspath(self.args.lib)
        assert mapped_ep_libraries(lib) == [lib], f"other ep_kernels libraries were loaded: {mapped_ep_libraries(lib)}"
        for key in sorted(self.counts):
            print(f"    {key}: {self.counts[key]}")
        total = sum(self.counts.values())
        if self.failures:
            print(f"sanitize_fuzz [{self.args.isa}]: {len(self.failures)} FAILED of {total} cases", file=sys.stderr)
            sys.exit(1)
        print(f"sanitize_fuzz [{self.args.isa}]: {total} cases OK")
        sys.exit(0)


def main():
    args = parse_args()
    load(args.lib)
    Runner(args).run()


if __name__ == "__main__":
    main()
