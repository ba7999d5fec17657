"""The source images: Fashion-MNIST from the Debian package's IDX files or the Hub, and each split's pool of them."""

from __future__ import annotations

import gzip
import os

import datasets
import numpy as np

from .vocabulary import FASHION_SCENES

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB_REPO = "zalando-datasets/fashion_mnist"


def _read_idx(path: str) -> np.ndarray:
    """Read a gzipped IDX file (the original MNIST / Fashion-MNIST format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_paths(directory: str, part: str) -> tuple[str, str]:
    return (
        os.path.join(directory, f"{part}-images-idx3-ubyte.gz"),
        os.path.join(directory, f"{part}-labels-idx1-ubyte.gz"),
    )


def load_fashion_mnist(part: str, fashion_mnist_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N×28×28 uint8) and labels (N,) of Fashion-MNIST ``part`` ("train" or "t10k").

    Reads the Debian package's IDX files from ``fashion_mnist_dir`` (default
    :data:`DEFAULT_FASHION_MNIST_DIR`); falls back to the Hub dataset :data:`FASHION_MNIST_HUB_REPO`.
    """
    if part not in ("train", "t10k"):
        raise ValueError(f"part must be 'train' or 't10k', got {part!r}")
    directory = fashion_mnist_dir or DEFAULT_FASHION_MNIST_DIR
    images_path, labels_path = _idx_paths(directory, part)
    if os.path.isfile(images_path) and os.path.isfile(labels_path):
        return _read_idx(images_path), _read_idx(labels_path)
    try:
        hub = datasets.load_dataset(FASHION_MNIST_HUB_REPO, split="train" if part == "train" else "test")
    except Exception as err:  # offline, not cached, no such repo: all end in the same advice
        raise FileNotFoundError(
            f"Fashion-MNIST is needed to build {FASHION_SCENES!r} and was found nowhere: no IDX files "
            f"{images_path} / {labels_path} (install the Debian package 'dataset-fashion-mnist' or pass "
            f"fashion_mnist_dir= to a folder holding {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz), "
            f"and the Hub dataset {FASHION_MNIST_HUB_REPO!r} could not be loaded "
            f"({type(err).__name__}: {err}); go online once or pre-download it."
        ) from err
    images = np.stack([np.asarray(image.convert("L"), dtype=np.uint8) for image in hub["image"]])
    return images, np.asarray(hub["label"], dtype=np.uint8)


def source_pools(
    num_train_images: int = 60_000, num_test_images: int = 10_000, seed: int = 0
) -> dict[str, tuple[str, np.ndarray]]:
    """Which Fashion-MNIST file ("train" / "t10k") and which of its indices each split draws from.

    Train and validation split the training images once, disjointly (a fixed permutation: the first
    sixth for validation, the rest for train); test uses all of ``t10k`` and nothing else.
    """
    order = np.random.default_rng([seed, 7]).permutation(num_train_images)
    num_validation = num_train_images // 6
    return {
        "train": ("train", np.sort(order[num_validation:])),
        "validation": ("train", np.sort(order[:num_validation])),
        "test": ("t10k", np.arange(num_test_images)),
    }

