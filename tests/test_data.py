"""Datasets of ep-train: the bundled digits, augmentation, and the errors of the optional ones."""
import os
import struct
import sys
import types

import numpy as np
import pytest
import torch

from ep_kernels.app import data

try:
    import torchvision.datasets  # noqa: F401
    HAS_TORCHVISION = True
except Exception:  # absent, or installed for another torch
    HAS_TORCHVISION = False


def test_digits_split_is_fixed_stratified_and_scaled():
    d = data.load_dataset("digits")
    assert d.name == "digits" and d.n_classes == 10
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.in_shape == (1, 8, 8)
    for x in (d.x_train, d.x_test):
        assert x.min() == 0.0 and x.max() == 1.0  # 0..16 scaled to [0, 1]
    # stratified: every class has 36 +- 1 held-out digits (1797 digits, ~180 per class)
    counts = torch.bincount(d.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # the split does not depend on anything but the constant split seed
    d2 = data.load_dataset("digits")
    assert torch.equal(d.x_test, d2.x_test) and torch.equal(d.y_train, d2.y_train)
    # train and test together are exactly the 1797 digits of scikit-learn
    from sklearn.datasets import load_digits
    images, _ = load_digits(return_X_y=True)
    both = torch.cat([d.x_train, d.x_test]).view(-1, 64).numpy() * 16
    assert both.shape[0] == images.shape[0]
    assert np.array_equal(np.sort(both.round().astype(np.int64), axis=0), np.sort(images.astype(np.int64), axis=0))


def test_limit():
    d = data.load_dataset("digits").limit(10, 7)
    assert d.x_train.shape[0] == 10 and d.y_train.shape[0] == 10 and d.x_test.shape[0] == 7
    with pytest.raises(ValueError, match="--limit-train"):
        data.load_dataset("digits").limit(0, None)


def test_unknown_dataset_and_missing_data_dir():
    with pytest.raises(ValueError, match="--dataset"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="--data-dir"):
        data.load_dataset("cifar10", data_dir=None)


def test_missing_torchvision_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(RuntimeError, match="pip install torchvision"):
        data.load_dataset("mnist", data_dir=str(tmp_path))


def _fake_torchvision(monkeypatch):
    """A stand-in for torchvision.datasets: the same attributes (.data, .targets) and the same
    error for a missing folder, so the conversion code is tested without torchvision."""
    def make(folder, n_train, n_test, shape, as_numpy):
        class Fake:
            def __init__(self, root, train=True, download=False):
                if not os.path.isdir(os.path.join(root, folder)):
                    raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
                n = n_train if train else n_test
                d = np.random.default_rng(n).integers(0, 256, (n,) + shape, dtype=np.uint8)
                self.data = d if as_numpy else torch.from_numpy(d)
                self.targets = list(range(n)) if as_numpy else torch.arange(n)
        return Fake

    tvd = types.ModuleType("torchvision.datasets")
    tvd.MNIST = make("MNIST", 6, 4, (28, 28), False)
    tvd.FashionMNIST = make("FashionMNIST", 6, 4, (28, 28), False)
    tvd.CIFAR10 = make("cifar-10-batches-py", 5, 3, (32, 32, 3), True)
    tvd.CIFAR100 = make("cifar-100-python", 5, 3, (32, 32, 3), True)
    tv = types.ModuleType("torchvision")
    tv.datasets = tvd
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", tvd)
    return tvd


def test_torchvision_datasets_are_converted_and_normalised(monkeypatch, tmp_path):
    tvd = _fake_torchvision(monkeypatch)
    with pytest.raises(RuntimeError, match="cifar-10-batches-py"):  # names the expected layout
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "MNIST").mkdir()
    d = data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert d.x_train.shape == (5, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32) and d.n_classes == 10
    assert d.y_train.dtype == torch.int64 and d.augment is data.cifar_augment
    raw = tvd.CIFAR10(str(tmp_path), train=True).data  # (N, H, W, C) uint8
    expect = (raw[1, 2, 3, 1] / 255.0 - data.CIFAR10_MEAN[1]) / data.CIFAR10_STD[1]
    assert d.x_train[1, 1, 2, 3].item() == pytest.approx(expect, rel=1e-5)
    m = data.load_dataset("mnist", data_dir=str(tmp_path))
    assert m.x_train.shape == (6, 1, 28, 28) and m.augment is None
    raw = tvd.MNIST(str(tmp_path), train=False).data
    expect = (raw[2, 5, 7].item() / 255.0 - data.MNIST_MEAN[0]) / data.MNIST_STD[0]
    assert m.x_test[2, 0, 5, 7].item() == pytest.approx(expect, rel=1e-5)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision not installed")
def test_missing_folder_names_expected_layout(tmp_path):
    with pytest.raises(RuntimeError, match="cifar-10-batches-py"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision not installed")
def test_mnist_from_local_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    d = data.load_dataset("mnist", data_dir=str(tmp_path))
    assert d.x_train.shape == (6, 1, 28, 28) and d.x_test.shape == (4, 1, 28, 28)
    assert d.y_train.dtype == torch.int64 and d.augment is None


def test_augmentation_choice():
    assert data.load_dataset("digits").augment is data.shift_augment  # default for digits: on
    assert data.load_dataset("digits", augment=False).augment is None
    assert data.load_dataset("digits", augment=True).augment is data.shift_augment


def test_shift_augment_translates_without_flipping():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 6, 6)
    out = data.shift_augment(x, g, pad=1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(x.shape[0]):
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 6]) for dy in range(3) for dx in range(3))


def test_cifar_augment_is_a_shifted_flipped_window():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    out = data.cifar_augment(x, g, pad=2)
    assert out.shape == x.shape
    # reproducible from the generator's state
    assert torch.equal(out, data.cifar_augment(x, torch.Generator().manual_seed(0), pad=2))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(x.shape[0]):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        candidates = windows + [w.flip(-1) for w in windows]
        assert any(torch.equal(out[i], c) for c in candidates)
