"""Batches from in-memory arrays through torch's DataLoader, augmentation on whole batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from distswitch.config import ConfigError
from distswitch.data.datasets import ArrayDataset, DatasetInfo


class _Batches(torch.utils.data.Dataset):
    """Indexed by a list of example indices; returns one normalised (augmented) batch."""

    def __init__(self, data: ArrayDataset, info: DatasetInfo, augment: bool, seed: int) -> None:
        self.data, self.augment, self.seed = data, augment and info.augment == "crop_flip", seed
        self.mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: list[int]):
        idx = torch.as_tensor(index)
        x = self.data.images[idx].float().div_(255)
        if self.augment:
            # Seeded by the batch's first index too, so a batch's augmentation does not depend on
            # which DataLoader worker builds it.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx[0]))
            x = _crop_flip(x, gen)
        return (x - self.mean) / self.std, self.data.labels[idx]


def _crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out


class BatchLoader:
    """Iterates (images float [B, C, H, W] normalised, labels int64 [B]) over one split.

    Training loaders shuffle with a per-epoch seed (`set_epoch`) derived from `seed`, so a resumed
    run sees the same order; they drop the last partial batch (BatchNorm needs > 1 example).
    """

    def __init__(self, data: ArrayDataset, info: DatasetInfo, batch_size: int, train: bool, seed: int = 0,
                 augment: bool = True, num_workers: int = 0) -> None:
        if train and batch_size > len(data):
            raise ConfigError(
                f"train.batch_size: {batch_size} is larger than the training split ({len(data)} examples); "
                "lower it or raise data.train_limit"
            )
        self.data, self.info, self.batch_size, self.train = data, info, batch_size, train
        self.seed, self.augment, self.num_workers = seed, augment and train, num_workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self):
        seed = self.seed * 10_007 + self.epoch
        if self.train:
            sampler = RandomSampler(range(len(self.data)), generator=torch.Generator().manual_seed(seed))
        else:
            sampler = SequentialSampler(range(len(self.data)))
        batches = BatchSampler(sampler, self.batch_size, drop_last=self.train)
        dataset = _Batches(self.data, self.info, self.augment, seed)
        return iter(DataLoader(dataset, sampler=batches, batch_size=None, num_workers=self.num_workers))
