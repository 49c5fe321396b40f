"""Real data sets that install offline (numpy only).

Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; MIT licence): 70,000 real 28x28 grayscale photos of
clothing in 10 classes, read from the IDX gzip files of the Debian package
``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) or from any folder holding
the four files under their usual names.
"""

from __future__ import annotations

import gzip
import os
from typing import Optional, Sequence

import numpy as np

#: Where the Debian package ``dataset-fashion-mnist`` puts the IDX files.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
#: Environment variable naming another folder that holds the four files.
FASHION_MNIST_ENV = "CONDUCTANCE_FASHION_MNIST"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
INSTALL_HINT = ("install the Debian package: `apt-get update && apt-get install -y dataset-fashion-mnist` "
                f"(root), or put the four IDX .gz files in a folder and set {FASHION_MNIST_ENV} to it")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into an array of its declared type and shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path} is truncated or corrupt: header declares shape {shape} ({expected} bytes), "
                         f"file holds {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_dir(root: Optional[str] = None) -> str:
    """The folder holding the Fashion-MNIST files; FileNotFoundError with install advice if none does."""
    candidates: Sequence[str] = ([root] if root else
                                 ([os.environ[FASHION_MNIST_ENV]] if os.environ.get(FASHION_MNIST_ENV) else [])
                                 + list(FASHION_MNIST_DIRS))
    needed = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, name)) for name in needed):
            return folder
    raise FileNotFoundError(f"Fashion-MNIST not found (looked in {list(candidates)} for {needed}); "
                            + INSTALL_HINT)


def fashion_mnist_available(root: Optional[str] = None) -> bool:
    try:
        fashion_mnist_dir(root)
    except FileNotFoundError:
        return False
    return True


def load_fashion_mnist(split: str = "train", root: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images and labels.

    Parameters
    ----------
    split : {"train", "test"}
        60,000 training or 10,000 test examples, in the files' order.
    root : str, optional
        Folder with the IDX files; default ``$CONDUCTANCE_FASHION_MNIST``, then the Debian
        package's ``/usr/share/datasets/fashion-mnist``.

    Returns
    -------
    images : uint8 array (n, 28, 28), 0 (background) .. 255
    labels : int64 array (n,), classes 0..9 named in ``FASHION_MNIST_CLASSES``
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    folder = fashion_mnist_dir(root)
    images_file, labels_file = FASHION_MNIST_FILES[split]
    images = read_idx(os.path.join(folder, images_file))
    labels = read_idx(os.path.join(folder, labels_file)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split} files disagree: images {images.shape}, labels {labels.shape}")
    return images, labels
