"""Dataset readers (registry) and the split into train / val / test.

Every dataset is read once into uint8 tensors [N, C, H, W]; at 28x28 and 32x32 the whole set fits
in memory, and batches are then slices rather than per-sample PIL decodes.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from distswitch.config import DataConfig
from distswitch.registry import Registry


class DataError(ValueError):
    """A user-facing data problem (missing files, bad root): the message says how to fix it."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    augment: str  # "crop_flip" (CIFAR: random crop, padding 4, horizontal flip) | "none"


@dataclass(frozen=True)
class ArrayDataset:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ArrayDataset":
        return ArrayDataset(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Splits:
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    info: DatasetInfo


Reader = Callable[[DataConfig], tuple[ArrayDataset, ArrayDataset, DatasetInfo]]
DATASETS: Registry[Reader] = Registry("dataset", "data.dataset")

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"


def load_splits(cfg: DataConfig) -> Splits:
    """Train / val / test. Val is carved from the training set by a permutation seeded with
    `split_seed` (independent of the training seed); `train_limit` keeps the first N remaining
    training examples in their original order."""
    train_full, test, info = DATASETS.get(cfg.dataset)(cfg)
    if cfg.val_size >= len(train_full):
        raise DataError(f"data.val_size: {cfg.val_size} leaves no training examples of {len(train_full)}; lower it")
    perm = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(cfg.split_seed))
    val_idx = perm[: cfg.val_size].sort().values
    train_idx = perm[cfg.val_size :].sort().values
    if cfg.train_limit is not None:
        train_idx = train_idx[: cfg.train_limit]
    return Splits(train_full.subset(train_idx), train_full.subset(val_idx), test, info)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "raw", root / "FashionMNIST" / "raw", root / "MNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def _idx_dataset(root: Path, prefix: str) -> ArrayDataset | None:
    images = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    x = torch.from_numpy(_read_idx(images).copy())[:, None]
    y = torch.from_numpy(_read_idx(labels).astype(np.int64))
    if len(x) != len(y):
        raise DataError(f"data.root: {images} has {len(x)} images but {labels} has {len(y)} labels; re-download")
    return ArrayDataset(x, y)


def _mnist_like(cfg: DataConfig, name: str, default_root: str, tv_class: str, mean: float, std: float):
    root = Path(cfg.root or default_root)
    train, test = _idx_dataset(root, "train"), _idx_dataset(root, "t10k")
    if (train is None or test is None) and cfg.download:
        import torchvision.datasets as tvd

        for split in (True, False):
            getattr(tvd, tv_class)(str(root), train=split, download=True)
        train, test = _idx_dataset(root, "train"), _idx_dataset(root, "t10k")
    if train is None or test is None:
        hint = "install Debian's dataset-fashion-mnist (make setup)" if name == "fashion-mnist" else "set data.download=true on a connected machine"
        raise DataError(f"data.root: no {name} IDX files under {str(root)!r}; {hint}, or point data.root at them")
    return train, test, DatasetInfo(name, 10, 1, 28, (mean,), (std,), "none")


@DATASETS.register("fashion-mnist")
def fashion_mnist(cfg: DataConfig):
    return _mnist_like(cfg, "fashion-mnist", FASHION_MNIST_DEBIAN, "FashionMNIST", 0.2860, 0.3530)


@DATASETS.register("mnist")
def mnist(cfg: DataConfig):
    return _mnist_like(cfg, "mnist", "data/mnist", "MNIST", 0.1307, 0.3081)


def _cifar(cfg: DataConfig, name: str, tv_class: str, classes: int):
    import torchvision.datasets as tvd

    root = cfg.root or f"data/{name}"
    try:
        sets = [getattr(tvd, tv_class)(root, train=split, download=cfg.download) for split in (True, False)]
    except RuntimeError as exc:
        raise DataError(f"data.root: {name} not found under {root!r} ({exc}); set data.download=true on a connected machine") from None
    train, test = (
        ArrayDataset(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets, dtype=torch.int64))
        for s in sets
    )
    # The authors' normalisation (method notes): mean (125.3, 123.0, 113.9)/255, std (63.0, 62.1, 66.7)/255.
    mean = (125.3 / 255, 123.0 / 255, 113.9 / 255)
    std = (63.0 / 255, 62.1 / 255, 66.7 / 255)
    return train, test, DatasetInfo(name, classes, 3, 32, mean, std, "crop_flip")


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig):
    return _cifar(cfg, "cifar10", "CIFAR10", 10)


@DATASETS.register("cifar100")
def cifar100(cfg: DataConfig):
    return _cifar(cfg, "cifar100", "CIFAR100", 100)
