"""torchvision-format data sets read from local files (nothing is downloaded).

MNIST and Fashion-MNIST are read from their IDX files, gzipped or not, either directly in the
given folder (Debian's dataset-fashion-mnist: /usr/share/datasets/fashion-mnist) or in
torchvision's layout (<root>/FashionMNIST/raw). CIFAR-10/100 and STL-10 go through torchvision's
readers with ``download=False``.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
from PIL import Image

from vissl_vit.data.datasets.base import ImageSource
from vissl_vit.errors import DataError
from vissl_vit.registry import DATASETS

_IDX_DIRS = {"MNIST": "MNIST", "FashionMNIST": "FashionMNIST"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}.")
    return arr.reshape(shape)


def _find_idx(root: str, name: str, stem: str) -> str:
    for folder in (root, os.path.join(root, _IDX_DIRS[name], "raw"), os.path.join(root, "raw")):
        for suffix in ("", ".gz"):
            path = os.path.join(folder, stem + suffix)
            if os.path.isfile(path):
                return path
    hint = " (Fashion-MNIST: apt-get install dataset-fashion-mnist, then /usr/share/datasets/fashion-mnist)"
    raise DataError(
        f"{name}: no file {stem}[.gz] in '{root}' or '{os.path.join(root, _IDX_DIRS[name], 'raw')}'"
        + (hint if name == "FashionMNIST" else "")
    )


class ArraySource(ImageSource):
    """Images held in memory as a uint8 array [N, H, W] or [N, H, W, C]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str) -> None:
        self.images, self.labels, self.name = images, labels, name

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


@DATASETS.register("torchvision_dataset")
def torchvision_dataset(path: str, label_path: str | None, name: str, train: bool, mmap: bool) -> ImageSource:
    if not os.path.isdir(path):
        raise DataError(f"torchvision_dataset {name}: '{path}' is not a folder.")
    if name in _IDX_DIRS:
        prefix = "train" if train else "t10k"
        images = read_idx(_find_idx(path, name, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(path, name, f"{prefix}-labels-idx1-ubyte"))
        return ArraySource(images, labels, name)
    import torchvision.datasets as tvd

    readers = {
        "CIFAR10": lambda: tvd.CIFAR10(path, train=train, download=False),
        "CIFAR100": lambda: tvd.CIFAR100(path, train=train, download=False),
        "STL10": lambda: tvd.STL10(path, split="train" if train else "test", download=False),
    }
    if name not in readers:
        raise DataError(
            f"torchvision_dataset: DATASET_NAMES entry '{name}' is not supported; "
            f"expected one of {', '.join(list(_IDX_DIRS) + list(readers))}."
        )
    try:
        ds = readers[name]()
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"torchvision_dataset {name} under '{path}': {e}") from None
    if name == "STL10":  # [N, C, H, W] -> [N, H, W, C]
        return ArraySource(np.transpose(ds.data, (0, 2, 3, 1)), ds.labels, name)
    return ArraySource(ds.data, np.asarray(ds.targets), name)
