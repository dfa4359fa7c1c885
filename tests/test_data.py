"""Datasets and loaders: IDX reading, the deterministic validation split, batches."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from distswitch.config import ConfigError, DataConfig
from distswitch.data import BatchLoader, load_splits
from distswitch.data.datasets import DataError


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    """An MNIST-layout folder (root/MNIST/raw, as torchvision downloads it) with 100 + 20 images."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 100), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_mnist_idx_files_are_read_in_the_torchvision_layout(tiny_mnist):
    splits = load_splits(DataConfig(dataset="mnist", root=str(tiny_mnist), val_size=10))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    assert splits.train.images.shape[1:] == (1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert splits.test.labels.tolist() == [i % 10 for i in range(20)]


def test_validation_split_is_disjoint_fixed_and_independent_of_train_limit(tiny_mnist):
    cfg = DataConfig(dataset="mnist", root=str(tiny_mnist), val_size=10)
    a, b = load_splits(cfg), load_splits(DataConfig(**{**cfg.__dict__, "train_limit": 30}))
    assert torch.equal(a.val.images, b.val.images)
    assert torch.equal(b.train.images, a.train.images[:30])  # the first N remaining examples
    train_rows = {bytes(x.numpy()) for x in a.train.images}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val.images)


def test_missing_files_are_a_data_error_naming_data_root(tmp_path):
    with pytest.raises(DataError, match="^data.root"):
        load_splits(DataConfig(dataset="mnist", root=str(tmp_path)))


def test_training_batches_are_normalised_shuffled_per_epoch_and_drop_the_tail(tiny_mnist):
    splits = load_splits(DataConfig(dataset="mnist", root=str(tiny_mnist), val_size=10))
    loader = BatchLoader(splits.train, splits.info, batch_size=32, train=True, seed=0)
    first = [y for _, y in loader]
    assert len(first) == len(loader) == 2  # 90 // 32
    loader.set_epoch(1)
    second = [y for _, y in loader]
    assert not torch.equal(torch.cat(first), torch.cat(second))
    loader.set_epoch(0)
    assert torch.equal(torch.cat(first), torch.cat([y for _, y in loader]))  # resumable order
    x, _ = next(iter(BatchLoader(splits.train, splits.info, batch_size=90, train=False)))
    expected = (splits.train.images.float() / 255 - splits.info.mean[0]) / splits.info.std[0]
    assert torch.allclose(x, expected)


def test_a_batch_larger_than_the_training_split_is_a_config_error(tiny_mnist):
    splits = load_splits(DataConfig(dataset="mnist", root=str(tiny_mnist), val_size=10))
    with pytest.raises(ConfigError, match="^train.batch_size"):
        BatchLoader(splits.train, splits.info, batch_size=91, train=True)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_any_number_of_workers_takes_each_global_batch_once_in_the_same_order(tiny_mnist, world):
    # 32 examples per global batch over 3 workers: 11 + 11 + 10 (an elastic group can have any size).
    splits = load_splits(DataConfig(dataset="mnist", root=str(tiny_mnist), val_size=10))
    whole = [y for _, y in BatchLoader(splits.train, splits.info, batch_size=32, train=True, seed=3)]
    shares = [
        [
            y
            for _, y in BatchLoader(
                splits.train, splits.info, batch_size=32, train=True, seed=3, rank=r, world_size=world
            )
        ]
        for r in range(world)
    ]
    for step, batch in enumerate(whole):
        parts = [share[step] for share in shares]
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
        assert torch.equal(torch.cat(parts), batch)
