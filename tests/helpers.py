"""Small networks and inputs shared by the tests (fresh random values, never zeros)."""
import torch
import torch.nn as nn

from ep_kernels import EPConv2d, EPLinear, EPNetwork


def make_net(kind, dtype=torch.float64, seed=0, activation="hardsigmoid_half", mse=False, H=8):
    torch.manual_seed(seed)
    if kind == "conv_pool":  # two pooled convs, 8x8 -> 4x4 -> 2x2
        layers = [EPConv2d(2, 5, 3, padding=1, pool=2), EPConv2d(5, 7, 3, padding=1, pool=2)]
        feat = 7 * (H // 4) ** 2
    elif kind == "conv_nopool":  # padding 0 and 1, kernels 3 and 5, no pooling
        layers = [EPConv2d(2, 5, 3, padding=0), EPConv2d(5, 6, 5, padding=1), EPConv2d(6, 3, 3, padding=1, pool=2)]
        feat = 3 * ((H - 4) // 2) ** 2
    elif kind == "mixed":  # conv with pool 3 on a size not divisible by it, then linear layers
        layers = [EPConv2d(2, 4, 3, padding=1, pool=3), EPLinear(4 * (H // 3) ** 2, 9), EPLinear(9, 10)]
        feat = 10
    elif kind == "linear":
        layers = [EPLinear(2 * H * H, 12), EPLinear(12, 10)]
        feat = 10
    else:
        raise ValueError(kind)
    readout = None if mse else nn.Linear(feat, 10)
    if mse:
        assert isinstance(layers[-1], EPLinear) and layers[-1].out_features == 10
    net = EPNetwork(*layers, readout=readout, activation=activation)
    return net.to(dtype)


def make_batch(n=4, H=8, dtype=torch.float64, seed=1, flat=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, H, H, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    return (x.flatten(1) if flat else x), y


def grads(net):
    return {n: p.grad.detach().clone() for n, p in net.named_parameters()}


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def relerr(a, b):
    return ((a - b).norm() / b.norm()).item()
