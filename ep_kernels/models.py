"""Network presets for ``ep-train``.

- ``small``: two pooled conv layers (64, 128 channels), for the bundled 8x8 digits (the default).
- ``vgg5``: the VGG-5 of Laborieux et al. 2021 / Lin et al. 2025: 128-256-512-512 channels,
  3x3 convolutions with padding 1, 1, 1, 0, a 2x2 max-pool after each, linear readout
  (32x32 inputs: 32 -> 16 -> 8 -> 4 -> 2 -> 1, readout 512 -> classes).
- ``mlp``: fully connected state layers, for quick checks.
- ``vgg11``, ``vgg13``, ``vgg16``: deep VGG-style EP networks for 32x32 inputs (docs/design.md,
  "Deep presets' initialisation"): 8, 10 and 13 3x3 convolutions with padding 1 in five blocks, a 2x2 max-pool on
  the last convolution of each block (``EPConv2d(pool=2)``: 32 -> 16 -> 8 -> 4 -> 2 -> 1),
  linear readout 512 -> classes. Channels 64-128-256-512-512 (times ``width``).
- ``deep8``: a reduced deep preset for the bundled 8x8 digits (CPU demonstrations of the
  vanishing nudge and of training with intermediate signals): 8 convolutions (3x3, padding 1)
  in four blocks of two, channels 16-32-64-64 (times ``width``), the first block at 8x8 and a
  2x2 max-pool ending each of the others (8 -> 4 -> 2 -> 1), so every convolution sees at
  least a 2x2 map.
- ``mnist_vgg6``: a deep preset for 28x28 inputs (``--dataset mnist5k``): 6 convolutions (3x3)
  in three stages of two, channels 16-16-32-32-64-64 (times ``width``), each convolution
  followed by a 2x2 max-pool, with padding 2 so that the maps last: 28 -> 15 -> 8 -> 5 -> 3 -> 2
  -> 2 (every convolution sees at least 2x2; readout 64*2*2 -> classes). Its initialisation and
  phases are its own (below); measured in ``examples/mnist5k_convergence.py`` (issue 12).

Deep presets record their blocks in ``net.block_ends`` (the index of each block's last layer);
``build_signals`` attaches the intermediate signals there by default (every block end except
the top layer, which the readout already supervises).

Initialisation of ``small``, ``vgg5`` and ``mlp``: PyTorch's default (uniform, fan-in scaled)
multiplied by ``init_scale`` (default 1), the ``my_init(scale)`` of Laborieux et al.'s code.

Deep presets need more care, measured on ``deep8`` (``examples/deep_digits.sh``): with the
default initialisation the states fade layer after layer (the top state hardly depends on the
input, and output-only EP stays at chance); scaled up, the states of a layer share one large
common offset (every state is >= 0, so ``W s`` carries ``mean(W) * sum(s)``) and the network
falls into input-independent attractors, where synchronous updates also oscillate. So deep
presets start from PyTorch's default weights, centred per output channel (zero mean over each
filter) in every layer that reads states (all but the first), times ``init_scale`` (default
``DEEP_GAIN / gain``: 3 with ``hardsigmoid_half``), with zero biases and the readout as PyTorch
makes it; and they relax with the ``alternating`` schedule (``EPNetwork``), which converges
where synchronous updates oscillate.

``mnist_vgg6``'s initialisation, measured on batches of 32 real digits (mnist5k; table and
levers: ``python examples/mnist5k_convergence.py``, which writes them to
``examples/results/mnist5k_convergence.*``; not yet committed). The free phase of a 6-layer chain of
symmetric couplings has two regimes, with a sharp edge between them, and the deep presets'
"centred filters times 3" lies on the wrong side of it:

- weak couplings (centred default filters times 1 to 1.5, or ``gain * ||W_l|| <= 1`` with
  ``||W_l||`` a layer's operator norm): the free phase converges fast (max residual <= 1e-4
  after 7 to 50 steps), the states carry the input (relative spread over the batch 0.3 to 1.1
  in every layer), but their amplitude fades layer after layer (mean state 5e-2 at layer 1,
  3e-5 to 6e-3 at layer 6). Such networks did not train: BPTT at lr 0.05 stayed at chance
  after 120 to 250 steps, whether with zero biases (the bias gradients, which do not shrink with
  the states, kill the faded units), PyTorch's default biases, no biases (and EP's gradient
  then departs from BPTT's even at convergence, cosine 0.0 to 0.8 in float64 at beta 1e-3:
  units fed only by the digits' zero background sit exactly at the clamp's kink) or a readout
  scaled up 10 to 100 times;
- strong couplings (``gain * ||W_l|| >= 1.1``, or centred filters times 2 to 3): the network
  "ignites", its states are large (mean 0.1 to 0.5 in every layer) and still input-dependent
  (spread 0.3 to 1), but the relaxation crawls: synchronous updates oscillate, alternating ones
  converge only when every convolution is pooled, and then in 117 to 233 steps.

Which the preset's choices follow from:

- a max-pool after every convolution (padding 2 keeps the maps): through a pool the forward
  drive takes the largest of four inputs while the top-down signal reaches only one of four,
  so the forward transfer is larger for the same loop gain. With the pools of VGG (after
  every second convolution) the strong regime never converged within 300 steps;
- every layer past the first scaled to ``gain * ||W_l|| = MNIST_VGG6_LINK`` (1.3: past the edge,
  the fastest-converging value measured among 1.1, 1.15, 1.2, 1.3, 1.5, 1.6, 2.0) from
  centred default filters; the first layer (which does not take part in the loop: x is
  clamped) at ``DEEP_GAIN / gain`` as the other deep presets; zero biases; PyTorch's readout.
  ``init_scale`` multiplies all of these (1 by default). Normalising by the operator norm
  rather than a fixed factor makes the edge independent of width and seed;
- the alternating schedule (synchronous updates do not converge here) and ``T1`` 250, ``T2``
  60 by default (ep-train's ``--T1``/``--T2`` override them; ep-train's own default T1 of 30
  is far too short for this preset).

Measured at width 0.5 over 3 seeds x 2 batches: 117 to 202 steps to a max residual of 1e-4
(width 1: 135 to 182), top-layer mean 0.23 to 0.26, spread 0.31 to 0.35; at the weights of
a 2-epoch BPTT pilot, 70 steps. This is a network that converges and carries the input, not
yet one that learns fast: that BPTT pilot (width 0.5, T1 150, lr 0.05) reached only 18% on
the held-out digits after 2 epochs, and its steps cost. An over-relaxed alternating update
(not a library option) converged it in 40 to 63 steps (see the example).

Why it does not learn was measured next (``examples/mnist5k_pilot.py``, results in
``examples/results/mnist5k_pilots.md``): over a dozen initialisations, no equilibrium network
of this layout learned from scratch in 150-300 steps (BPTT through 30-60 steps or EP at the
fixed point; SGD 0.002-0.05, Adam 3e-4-1e-3), while the same weights learn as a feed-forward
network (92.7% after 400 steps) or unrolled for 6 steps at lr 0.01 (89.7%); from
feed-forward-trained weights EP and BPTT both fine-tune (89.6% and 87.1% after 100 steps).
The layout's own ceiling by backprop was 94.7% (20 epochs, no augmentation). The preset
itself learns at lr 0.01, slowly (EP 50.8% after 4 epochs, 81.5% after 9 in 29 minutes;
the 18% pilot ran at lr 0.05);
it is kept as it is until a better one is found.

Layers are named ``layers.<i>`` and ``readout`` (``EPNetwork``), which is what per-layer
learning rates refer to.
"""
import math

import torch
import torch.nn as nn

from .relaxation import ACTIVATION_GAIN
from .layers import EPConv2d, EPLinear
from .network import EPNetwork

PRESETS = ("small", "vgg5", "mlp", "vgg11", "vgg13", "vgg16", "deep8", "mnist_vgg6")

# Blocks of (channels, number of 3x3 convolutions, pool after the block).
DEEP_BLOCKS = {
    "vgg11": [(64, 1, 2), (128, 1, 2), (256, 2, 2), (512, 2, 2), (512, 2, 2)],
    "vgg13": [(64, 2, 2), (128, 2, 2), (256, 2, 2), (512, 2, 2), (512, 2, 2)],
    "vgg16": [(64, 2, 2), (128, 2, 2), (256, 3, 2), (512, 3, 2), (512, 3, 2)],
    "deep8": [(16, 2, 1), (32, 2, 2), (64, 2, 2), (64, 2, 2)],
    "mnist_vgg6": [(16, 2, 2), (32, 2, 2), (64, 2, 2)],
}
# Presets whose every convolution is pooled, with this padding (mnist_vgg6: see the docstring).
POOL_EVERY_CONV = {"mnist_vgg6": 2}
# Smallest input (H = W) of each deep preset, for the error message.
DEEP_MIN_INPUT = {"deep8": "8x8"}
# mnist_vgg6's coupling: every layer past the first starts at gain * ||W|| = MNIST_VGG6_LINK
# (||W||: its convolution's operator norm at its input size; see the module docstring).
MNIST_VGG6_LINK = 1.3
# mnist_vgg6's own phase lengths, used when T1 / T2 are not given (ep-train always gives them).
MNIST_VGG6_T1, MNIST_VGG6_T2 = 250, 60
# Deep presets' default init_scale times the activation's gain (see the module docstring).
DEEP_GAIN = 1.5
SIGNAL_KINDS = ("classifier", "feature", "logit")


def _conv_stack(in_shape, specs, n_classes):
    """EPConv2d layers from (out_channels, kernel, padding, pool) specs; checks the sizes fit."""
    c, h, w = in_shape
    layers = []
    for out, k, pad, pool in specs:
        layer = EPConv2d(c, out, k, padding=pad, pool=pool)
        c, h, w = layer.state_shape((c, h, w))
        layers.append(layer)
    return layers, nn.Linear(c * h * w, n_classes)


def build_network(name, in_shape, n_classes, activation="hardsigmoid_half", init_scale=None, width=None,
                  schedule=None, **kw):
    """An ``EPNetwork`` for inputs of shape ``in_shape`` = (C, H, W) and ``n_classes`` classes.

    ``width`` scales the channel / unit counts (1.0 = the preset's own). ``init_scale`` and
    ``schedule`` default per preset (see the module docstring: deep presets 3 and
    ``'alternating'`` with ``hardsigmoid_half``; the others 1 and ``'synchronous'``). Other
    keywords (T1, T2, beta, nudging) go to ``EPNetwork``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (--preset); choose one of {', '.join(PRESETS)}")
    if activation not in ACTIVATION_GAIN:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION_GAIN)}, got {activation!r}")
    in_shape = tuple(int(v) for v in in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"build_network needs in_shape = (C, H, W), got {in_shape}")
    w = 1.0 if width is None else float(width)
    if w <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if init_scale is not None and not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    ch = lambda n: max(1, int(round(n * w)))  # noqa: E731
    deep = name in DEEP_BLOCKS

    if name == "small":
        # 8x8 -> 4x4 -> 2x2. Larger inputs (MNIST 28x28) also work: 28 -> 14 -> 7 -> 3 (floor).
        # 64-128 channels: on the digits, 32-64 overfits (about 2 points lower test accuracy).
        layers, readout = _conv_stack(in_shape, [(ch(64), 3, 1, 2), (ch(128), 3, 1, 2)], n_classes)
    elif name == "vgg5":
        try:
            layers, readout = _conv_stack(
                in_shape, [(ch(128), 3, 1, 2), (ch(256), 3, 1, 2), (ch(512), 3, 1, 2), (ch(512), 3, 0, 2)],
                n_classes)
        except ValueError as e:
            raise ValueError(f"preset 'vgg5' needs inputs of at least 32x32 pixels (it was made for CIFAR); "
                             f"got shape {in_shape}: {e}") from e
    elif deep:
        specs, block_ends = [], []
        for c, n, pool in DEEP_BLOCKS[name]:
            if name in POOL_EVERY_CONV:
                specs += [(ch(c), 3, POOL_EVERY_CONV[name], pool)] * n
            else:
                specs += [(ch(c), 3, 1, 1)] * (n - 1) + [(ch(c), 3, 1, pool)]
            block_ends.append(len(specs) - 1)
        try:
            layers, readout = _conv_stack(in_shape, specs, n_classes)
        except ValueError as e:
            need = DEEP_MIN_INPUT.get(name, "32x32")
            raise ValueError(f"preset {name!r} needs inputs of at least {need} pixels; got shape {in_shape}: {e}") \
                from e
    else:  # mlp
        n_in = math.prod(in_shape)
        layers = [EPLinear(n_in, ch(256))]
        readout = nn.Linear(ch(256), n_classes)

    centred_scale = None
    if name == "mnist_vgg6":
        centred_scale = normalised_scales(layers, in_shape, ACTIVATION_GAIN[activation], MNIST_VGG6_LINK,
                                          1.0 if init_scale is None else float(init_scale))
        centred_init_(layers, centred_scale)
    elif deep:
        centred_scale = DEEP_GAIN / ACTIVATION_GAIN[activation] if init_scale is None else float(init_scale)
        centred_init_(layers, centred_scale)
    elif init_scale is not None and init_scale != 1.0:
        with torch.no_grad():
            for p in [p for m in list(layers) + [readout] for p in m.parameters()]:
                p.mul_(init_scale)
    if name == "mnist_vgg6":
        kw.setdefault("T1", MNIST_VGG6_T1)
        kw.setdefault("T2", MNIST_VGG6_T2)
    if schedule is None:
        schedule = "alternating" if deep else "synchronous"
    net = EPNetwork(*layers, readout=readout, activation=activation, schedule=schedule, **kw)
    net.block_ends = tuple(block_ends) if deep else _pooled_ends(net)
    net.centred_init_scale = centred_scale  # Teacher.like repeats it
    return net


@torch.no_grad()
def centred_init_(layers, scale):
    """The deep presets' initialisation, in place on layers with PyTorch's default weights:
    filters centred per output channel in every layer that reads states (all but the first),
    times ``scale`` (one number, or one per layer); zero biases."""
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(layers)
    if len(scales) != len(layers):
        raise ValueError(f"centred_init_: {len(scales)} scales for {len(layers)} layers")
    for i, layer in enumerate(layers):
        w = layer.weight
        if i > 0:  # reads states, which are >= 0: remove the common offset mean(W) * sum(s)
            w.sub_(_channel_means(w))
        w.mul_(float(scales[i]))
        if layer.bias is not None:
            layer.bias.zero_()


def _channel_means(w):
    return w.mean(dim=tuple(range(1, w.dim())), keepdim=True)


@torch.no_grad()
def operator_norm(layer, in_shape, weight=None, iters=200):
    """Largest singular value of ``layer``'s linear map (an ``EPConv2d``'s convolution before its
    pooling, at input size ``in_shape`` = (C, H, W); an ``EPLinear``'s matrix), with ``weight``
    in place of the layer's own if given, by power iteration from a fixed start (it uses no
    global random state)."""
    w = (layer.weight if weight is None else weight).detach()
    g = torch.Generator().manual_seed(0)
    if isinstance(layer, EPConv2d):
        args = layer.conv_args()
        fwd = lambda v: torch.nn.functional.conv2d(v, w, None, **args)  # noqa: E731
        shape = (1,) + tuple(in_shape)
        out_hw = fwd(torch.zeros(shape, dtype=w.dtype)).shape[-2:]
        back = lambda u: torch.nn.functional.conv_transpose2d(  # noqa: E731
            u, w, None, args["stride"], args["padding"], _output_padding(in_shape[1:], out_hw, layer),
            args["groups"], args["dilation"])
    else:
        fwd, back, shape = (lambda v: v @ w.T), (lambda u: u @ w), (1, w.shape[1])
    v = torch.randn(shape, generator=g, dtype=w.dtype)
    sigma = 0.0
    for _ in range(iters):
        v = v / v.norm()
        u = fwd(v)
        sigma = float(u.norm())
        v = back(u)
    return sigma


def _output_padding(in_hw, out_hw, layer):
    """The transposed convolution's output_padding that gives back the input size ``in_hw``."""
    k, st, pad, dil = layer.kernel_size, layer.stride, layer.conv_args()["padding"], layer.dilation
    return [in_hw[i] - ((out_hw[i] - 1) * st[i] - 2 * pad[i] + dil[i] * (k[i] - 1) + 1) for i in range(2)]


def normalised_scales(layers, in_shape, gain, link, init_scale=1.0):
    """Per-layer factors of ``centred_init_`` for ``mnist_vgg6`` (see the module docstring): the
    first layer ``DEEP_GAIN / gain`` (as the other deep presets), every later one
    ``link / (gain * ||W_l||)`` with ``||W_l||`` the operator norm of its centred default
    filters at its input size; all times ``init_scale``."""
    scales, shape = [DEEP_GAIN / gain * init_scale], tuple(in_shape)
    for i, layer in enumerate(layers):
        if i > 0:
            w = layer.weight.detach()
            scales.append(link / (gain * operator_norm(layer, shape, w - _channel_means(w))) * init_scale)
        shape = tuple(layer.state_shape(shape))
    return tuple(scales)


def _pooled_ends(net):
    """Block ends of a network without recorded blocks: its pooled layers, and the top one."""
    ends = [i for i, l in enumerate(net.layers) if getattr(l, "pool", 1) > 1]
    top = len(net.layers) - 1
    return tuple(ends if ends and ends[-1] == top else ends + [top])


def default_signal_layers(net):
    """Where intermediate signals attach by default: the end of every block except the top
    layer (the readout's cost already nudges it). Empty for a one-block network."""
    ends = getattr(net, "block_ends", None) or _pooled_ends(net)
    return [i for i in ends if i != len(net.layers) - 1]


def _layer_channels(layer):
    return layer.out_channels if isinstance(layer, EPConv2d) else layer.out_features


def parse_signal_kinds(text):
    """``"classifier,feature"`` / ``"none"`` / a list -> a tuple of kinds (checked, no repeats)."""
    if text is None:
        return ()
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    parts = [p for p in parts if p]
    if parts in (["none"], []):
        return ()
    bad = [p for p in parts if p not in SIGNAL_KINDS]
    if bad:
        raise ValueError(f"unknown signal kind {bad[0]!r} (--signals); choose from {', '.join(SIGNAL_KINDS)}, "
                         "comma-separated, or 'none'")
    if len(set(parts)) != len(parts):
        raise ValueError(f"--signals lists a kind twice: {text!r}")
    return tuple(parts)


def parse_signal_layers(text, net=None):
    """``"auto"`` or ``"1,3,5"`` (layer indices, negative counts from the end) -> list or "auto"."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return "auto"
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        vals = [int(p) for p in parts if str(p).strip()]
    except ValueError:
        raise ValueError(f"--signal-layers must be 'auto' or comma-separated layer indices, got {text!r}") from None
    if net is not None:
        n = len(net.layers)
        for v in vals:
            if not -n <= v < n:
                raise ValueError(f"--signal-layers: layer {v} is out of range for this network's {n} layers "
                                 f"(0..{n - 1})")
    return vals


def build_signals(net, kinds=("classifier",), layers="auto", lambdas=1.0, tau=4.0, pool_size=1, attach=True):
    """Intermediate error signals for ``net`` (docs/design.md, "Signal kinds"); attached to ``net.signals``
    (replacing any there) unless ``attach=False``. Returns the list of signals.

    - ``kinds``: any of ``"classifier"`` (a ``LocalClassifier`` at each chosen layer),
      ``"feature"`` (a ``FeatureDistillation`` at each chosen layer: 1x1 map to the teacher's
      feature map of the same layer, which has the same shape for ``Teacher.like(net)``) and
      ``"logit"`` (one ``LogitDistillation`` at the readout, temperature ``tau``).
    - ``layers``: ``"auto"`` (``default_signal_layers``: every block end but the top) or a list
      of layer indices.
    - ``lambdas``: one weight for every signal, or one per kind (a list in the order of
      ``kinds``, or a dict kind -> weight).
    """
    from .intermediate import FeatureDistillation, LocalClassifier, LogitDistillation

    kinds = parse_signal_kinds(kinds)
    where = default_signal_layers(net) if layers == "auto" else parse_signal_layers(layers, net)
    n = len(net.layers)
    where = [i + n if i < 0 else i for i in where]
    if isinstance(lambdas, dict):
        missing = [k for k in kinds if k not in lambdas]
        if missing:
            raise ValueError(f"lambdas has no weight for signal kind {missing[0]!r}")
        lam = {k: float(lambdas[k]) for k in kinds}
    elif isinstance(lambdas, (list, tuple)):
        if len(lambdas) == 1:
            lam = {k: float(lambdas[0]) for k in kinds}
        elif len(lambdas) != len(kinds):
            raise ValueError(f"--lambda has {len(lambdas)} values for {len(kinds)} signal kinds "
                             f"({', '.join(kinds) or 'none'}): give one value, or one per kind in that order")
        else:
            lam = {k: float(v) for k, v in zip(kinds, lambdas)}
    else:
        lam = {k: float(lambdas) for k in kinds}
    if any(k != "logit" for k in kinds) and not where:
        raise ValueError("no layer to attach intermediate signals to: this network has a single block; "
                         "give --signal-layers explicitly")
    sigs = []
    for kind in kinds:
        if kind == "logit":
            if net.readout is None:
                raise ValueError("logit distillation needs a network with a readout")
            sigs.append(LogitDistillation("readout", weight=lam[kind], tau=tau))
            continue
        for i in where:
            layer = net.layers[i]
            c = _layer_channels(layer)
            if kind == "classifier":
                if net.n_classes is None:
                    raise ValueError("a local classifier needs to know the number of classes")
                sigs.append(LocalClassifier(i, c, net.n_classes, weight=lam[kind],
                                            pool_size=pool_size if isinstance(layer, EPConv2d) else 1))
            else:
                sigs.append(FeatureDistillation(i, c, weight=lam[kind], conv=isinstance(layer, EPConv2d)))
    if attach:
        p = next(net.parameters())
        net.signals = nn.ModuleList(sigs).to(device=p.device, dtype=p.dtype)
    return sigs
