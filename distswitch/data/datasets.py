"""Dataset readers (registry) and the split into train / val / test.

Every dataset is read once into uint8 tensors [N, C, H, W]; at 28x28 and 32x32 the whole set fits
in memory, and batches are then slices rather than per-sample PIL decodes.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from distswitch.config import ConfigError, DataConfig
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
    # "crop_flip" (CIFAR: random crop, padding 4, horizontal flip) | "none" |
    # "resized_crop" (imagefolder: random resized crop + flip; centre crop for evaluation)
    augment: str
    classes: tuple[str, ...] = ()


def input_info(info: DatasetInfo, channels: int | None, image_size: int | None) -> DatasetInfo:
    """What the model sees: the dataset's shape, or the configured `data.channels` / `data.image_size`
    (a grayscale channel replicated; smaller images padded with black, centred)."""
    if channels is not None and channels != info.channels:
        if info.channels != 1:
            raise DataError(
                f"data.channels: {info.name} has {info.channels} channels and cannot be shown as {channels}; "
                "use null or 3"
            )
        info = replace(info, channels=channels, mean=info.mean * channels, std=info.std * channels)
    if image_size is not None and image_size != info.image_size:
        if image_size < info.image_size and info.augment != "resized_crop":
            raise DataError(
                f"data.image_size: {image_size} is smaller than {info.name}'s {info.image_size}x{info.image_size} "
                "images (only padding is done); use null or a larger size"
            )
        info = replace(info, image_size=image_size)
    return info


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
    train_idx, val_idx = split_indices(len(train_full), cfg.val_size, cfg.split_seed)
    if cfg.train_limit is not None:
        train_idx = train_idx[: cfg.train_limit]
    return Splits(train_full.subset(train_idx), train_full.subset(val_idx), test, info)


def split_indices(n: int, val_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into a training set of `n`, each sorted: the one split every loader uses."""
    if val_size >= n:
        raise DataError(f"data.val_size: {val_size} leaves no training examples of {n}; lower it")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def check_batch(batch_size: int, n_train: int, world_size: int) -> None:
    if batch_size > n_train:
        raise ConfigError(
            f"train.batch_size: {batch_size} is larger than the training split ({n_train} examples); "
            "lower it or raise data.train_limit"
        )
    if batch_size < 2 * world_size:
        raise ConfigError(
            f"train.batch_size: {batch_size} gives {world_size} workers fewer than 2 examples each; "
            "raise it or use fewer workers"
        )


def batch_share(batch_size: int, rank: int, world_size: int) -> slice:
    """Worker `rank`'s part of every global batch: [B*r//w, B*(r+1)//w), sizes differing by at most
    one example (the engine weights each worker's loss by its size)."""
    return slice(batch_size * rank // world_size, batch_size * (rank + 1) // world_size)


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
        hint = (
            "install Debian's dataset-fashion-mnist (make setup)"
            if name == "fashion-mnist"
            else "set data.download=true on a connected machine"
        )
        raise DataError(f"data.root: no {name} IDX files under {str(root)!r}; {hint}, or point data.root at them")
    return train, test, DatasetInfo(name, 10, 1, 28, (mean,), (std,), "none", CLASSES[name])


CLASSES = {
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "mnist": tuple(str(d) for d in range(10)),
}


@DATASETS.register("fashion-mnist")
def fashion_mnist(cfg: DataConfig):
    return _mnist_like(cfg, "fashion-mnist", FASHION_MNIST_DEBIAN, "FashionMNIST", 0.2860, 0.3530)


@DATASETS.register("mnist")
def mnist(cfg: DataConfig):
    return _mnist_like(cfg, "mnist", "data/mnist", "MNIST", 0.1307, 0.3081)


# name: (torchvision class, folder in the archive, train files, test files, meta file, class-name key, label key)
_CIFAR = {
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "label_names",
        "labels",
    ),
    "cifar100": ("CIFAR100", "cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
}


def _cifar(cfg: DataConfig, name: str):
    """CIFAR's python batches, read here (torchvision only downloads them): its reader demands the
    official files' MD5s, so a subset or a re-packed copy could not be used, and a damaged file
    deserves a message naming it."""
    tv_class, folder, train_files, test_files, meta_file, names_key, labels_key = _CIFAR[name]
    root = Path(cfg.root or f"data/{name}")
    base = root / folder
    if not base.is_dir() and cfg.download:
        import torchvision.datasets as tvd

        getattr(tvd, tv_class)(str(root), train=True, download=True)  # one archive, both splits, MD5-checked
    missing = [f for f in [*train_files, *test_files, meta_file] if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"data.root: no {name} batches under {str(base)!r} (missing {', '.join(missing)}); set "
            f"data.download=true on a connected machine, or point data.root at the folder holding {folder}/"
        )
    classes = tuple(str(c) for c in _unpickle(base / meta_file)[names_key])
    train, test = (_cifar_split(base, files, labels_key, len(classes)) for files in (train_files, test_files))
    # The authors' normalisation (method notes): mean (125.3, 123.0, 113.9)/255, std (63.0, 62.1, 66.7)/255.
    mean = (125.3 / 255, 123.0 / 255, 113.9 / 255)
    std = (63.0 / 255, 62.1 / 255, 66.7 / 255)
    return train, test, DatasetInfo(name, len(classes), 3, 32, mean, std, "crop_flip", classes)


def _unpickle(path: Path) -> dict:
    import pickle

    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except Exception as exc:  # truncated or foreign: name the file, not the unpickler's state
        raise DataError(
            f"data.root: {str(path)!r} cannot be read as a CIFAR batch ({type(exc).__name__}); "
            "download it again (data.download=true after deleting the folder)"
        ) from None
    if not isinstance(entry, dict):
        raise DataError(f"data.root: {str(path)!r} is not a CIFAR batch (no dict inside)")
    return entry


def _cifar_split(base: Path, files: list[str], labels_key: str, num_classes: int) -> ArrayDataset:
    images, labels = [], []
    for name in files:
        entry = _unpickle(base / name)
        data, targets = np.asarray(entry.get("data", []), dtype=np.uint8), np.asarray(entry.get(labels_key, []))
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(targets) != len(data) or len(data) == 0:
            raise DataError(
                f"data.root: {str(base / name)!r} is not a CIFAR batch: expected 'data' [N, 3072] uint8 "
                f"and N '{labels_key}', got data {data.shape} and {len(targets)} labels"
            )
        if targets.min() < 0 or targets.max() >= num_classes:
            raise DataError(f"data.root: {str(base / name)!r} has labels outside 0..{num_classes - 1}")
        images.append(data)
        labels.append(targets)
    x = torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32)  # CIFAR stores planes: R, G, B
    return ArrayDataset(x.contiguous(), torch.from_numpy(np.concatenate(labels).astype(np.int64)))


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig):
    return _cifar(cfg, "cifar10")


@DATASETS.register("cifar100")
def cifar100(cfg: DataConfig):
    return _cifar(cfg, "cifar100")


@DATASETS.register("imagefolder", stored_as="images")  # for FFCV: RGB images, not raw arrays
def imagefolder(cfg: DataConfig):
    # A class-per-folder tree (ImageNet size) does not fit in memory: it is read from .beton files only.
    raise DataError(
        "data.dataset: imagefolder is read from .beton files only; run `distswitch data prepare "
        "imagefolder --root TREE --out DIR` and set data.loader=ffcv data.beton_dir=DIR"
    )
