"""Datasets for ``ep-train``, held in memory as tensors.

- ``digits`` (the default): scikit-learn's 1797 real 8x8 handwritten digits, bundled with
  scikit-learn so nothing is downloaded. Pixel values 0..16 are scaled to [0, 1]. A fixed,
  seeded, stratified split keeps 360 digits (20%) as a held-out test set; the split never
  depends on the training seed, so every run is evaluated on the same digits.
- ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``: read from a local folder in
  torchvision's layout (``--data-dir``) through torchvision, which is then required (it is not a
  dependency of ep_kernels). ``download=True`` is only attempted when asked for.

Everything is loaded into tensors once and batched by the trainer: a DataLoader with per-image
transforms would be slower for these small images and would make exact resumption harder. The
CIFAR augmentation (random crop 32 with padding 4, horizontal flip) is done per batch with an
explicit ``torch.Generator``, so it is reproducible and its state can be checkpointed.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")

# Seed of the digits train/test split: a constant, not the training seed (see module doc).
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_SIZE = 360

# Per-channel means and standard deviations used by the usual CIFAR and MNIST pipelines.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)


@dataclass
class Dataset:
    """Train and test splits as tensors: ``x`` float32 (N, C, H, W), ``y`` int64 (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    # Training-time augmentation of a batch: fn(x, generator) -> x. None: no augmentation.
    augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None

    @property
    def in_shape(self):
        return tuple(self.x_train.shape[1:])

    def limit(self, n_train=None, n_test=None):
        """The first ``n_train`` / ``n_test`` examples (for quick runs and tests)."""
        for opt, n in (("--limit-train", n_train), ("--limit-test", n_test)):
            if n is not None and n < 1:
                raise ValueError(f"{opt} must be a positive number of examples, got {n}")
        return Dataset(self.name, self.x_train[:n_train], self.y_train[:n_train], self.x_test[:n_test],
                       self.y_test[:n_test], self.n_classes, self.augment)


def load_dataset(name="digits", data_dir=None, download=False):
    """Load dataset ``name`` (one of ``DATASETS``) into memory."""
    if name == "digits":
        return load_digits()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (--dataset); choose one of {', '.join(DATASETS)}")
    return _load_torchvision(name, data_dir, download)


def load_digits():
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    images, labels = sk_load_digits(return_X_y=True)
    x = torch.from_numpy((images / 16.0).astype(np.float32)).view(-1, 1, 8, 8)
    y = torch.from_numpy(labels.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_SIZE, stratify=labels,
                                           random_state=DIGITS_SPLIT_SEED)
    idx_train, idx_test = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_test))
    return Dataset("digits", x[idx_train].contiguous(), y[idx_train].contiguous(), x[idx_test].contiguous(),
                   y[idx_test].contiguous(), 10)


# --- torchvision datasets ------------------------------------------------------------------

_LAYOUT = {
    "mnist": "<data-dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "fashion-mnist": "<data-dir>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "cifar10": "<data-dir>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
    "cifar100": "<data-dir>/cifar-100-python/{train,test,meta}",
}


def _import_torchvision(name):
    try:
        import torchvision  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"dataset {name!r} is read through torchvision, which is not installed (it is optional for "
            f"ep_kernels). Install the torchvision build matching your torch "
            f"(torch {torch.__version__}), e.g.  pip install torchvision  -- or use --dataset digits, which "
            f"needs nothing else."
        ) from e
    import torchvision.datasets as tvd
    return tvd


def _load_torchvision(name, data_dir, download):
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs --data-dir: a folder laid out as torchvision expects, "
                         f"{_LAYOUT[name]}")
    tvd = _import_torchvision(name)
    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10,
           "cifar100": tvd.CIFAR100}[name]
    try:
        train = cls(str(data_dir), train=True, download=download)
        test = cls(str(data_dir), train=False, download=download)
    except RuntimeError as e:
        # torchvision says "Dataset not found or corrupted"; say where we looked and what we expect.
        hint = "" if download else " (or pass --download to fetch it, if this machine has network access)"
        raise RuntimeError(f"could not read dataset {name!r} from --data-dir {data_dir!r}: {e}. Expected the "
                           f"layout {_LAYOUT[name]}{hint}") from e

    if name in ("mnist", "fashion-mnist"):
        mean, std = (MNIST_MEAN, MNIST_STD) if name == "mnist" else (FASHION_MEAN, FASHION_STD)
        to_x = lambda d: d.data.to(torch.float32).div_(255.0).unsqueeze(1)  # noqa: E731  (N, 1, 28, 28)
        to_y = lambda d: torch.as_tensor(d.targets, dtype=torch.int64)  # noqa: E731
        augment = None
        n_classes = 10
    else:
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        to_x = lambda d: torch.from_numpy(d.data).to(torch.float32).div_(255.0).permute(0, 3, 1, 2)  # noqa: E731
        to_y = lambda d: torch.as_tensor(d.targets, dtype=torch.int64)  # noqa: E731
        augment = cifar_augment
        n_classes = 10 if name == "cifar10" else 100

    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    norm = lambda x: ((x - m) / s).contiguous()  # noqa: E731
    # Normalising before augmentation is equivalent to torchvision's order (crop/flip, then
    # normalise) except for the zero padding of the crop, which then pads with the mean
    # colour instead of black: the common choice for normalised inputs.
    return Dataset(name, norm(to_x(train)), to_y(train), norm(to_x(test)), to_y(test), n_classes, augment)


def cifar_augment(x, generator, pad=4):
    """Random crop (size of ``x``, zero padding ``pad``) and random horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    idx_n = torch.arange(n).view(n, 1, 1)
    # Advanced indexing gathers each image's window: result (n, h, w, C) -> (n, C, h, w).
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()
