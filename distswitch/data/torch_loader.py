"""Batches from in-memory arrays through torch's DataLoader (`data.loader: torch`), augmentation
on whole batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from distswitch.data.datasets import ArrayDataset, DatasetInfo, batch_share, check_batch
from distswitch.data.transform import InputTransform


class _Batches(torch.utils.data.Dataset):
    """Indexed by (global batch, slice); returns this worker's slice as uint8 (augmented)."""

    def __init__(self, data: ArrayDataset, info: DatasetInfo, augment: bool, seed: int) -> None:
        self.data, self.augment, self.seed = data, augment and info.augment == "crop_flip", seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[list[int], slice]):
        batch, part = item
        idx = torch.as_tensor(batch)
        x = self.data.images[idx[part]]
        if self.augment:
            # Drawn for the whole global batch (seeded by its first index), then sliced: an example's
            # augmentation does not depend on the number of workers or on which loader process runs.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx[0]))
            x = _crop_flip(x, gen, len(idx), part)
        return x, self.data.labels[idx[part]]


def _crop_flip(x: torch.Tensor, gen: torch.Generator, n: int, part: slice, pad: int = 4) -> torch.Tensor:
    """Random crops (zero padding `pad`) and flips; parameters drawn for `n` examples, `part` applied."""
    _, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)[part]
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)[part]
    flip = (torch.rand(n, generator=gen) < 0.5)[part]
    padded = F.pad(x, (pad, pad, pad, pad))
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(len(x))])
    out[flip] = out[flip].flip(-1)
    return out


class BatchLoader:
    """Iterates (images float [B, C, H, W] normalised, labels int64 [B]) over one worker's share.

    Training: `batch_size` is the global batch. Every worker draws the same per-epoch permutation
    (`set_epoch`, seeded from `seed`, so a resumed run sees the same order), cuts it into global
    batches and takes its slice of each (`batch_share`; the engine weights its loss by the slice's
    size), so `world_size` workers make the same steps as one worker x B. The last partial global
    batch is dropped (BatchNorm needs > 1 example and workers must take equal steps). Evaluation: each worker reads a contiguous
    1/world_size of the split in batches of `batch_size`; sum the metrics across workers.
    """

    def __init__(
        self,
        data: ArrayDataset,
        info: DatasetInfo,
        batch_size: int,
        train: bool,
        seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        transform: InputTransform | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if train:
            check_batch(batch_size, len(data), world_size)
        self.data, self.info, self.batch_size, self.train = data, info, batch_size, train
        self.seed, self.augment, self.num_workers = seed, augment and train, num_workers
        self.rank, self.world_size = rank, world_size
        self.transform = transform or InputTransform(info, info)
        self.device = torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.train:
            return len(self.data) // self.batch_size
        return -(-len(self._eval_range()) // self.batch_size)

    def _eval_range(self) -> range:
        n, w, r = len(self.data), self.world_size, self.rank
        return range(n * r // w, n * (r + 1) // w)

    def __iter__(self):
        seed = self.seed * 10_007 + self.epoch
        if self.train:
            sampler = RandomSampler(range(len(self.data)), generator=torch.Generator().manual_seed(seed))
            part = batch_share(self.batch_size, self.rank, self.world_size)
        else:
            sampler = self._eval_range()  # this worker's contiguous share, in order
            part = slice(None)
        batches = BatchSampler(sampler, self.batch_size, drop_last=self.train)
        dataset = _Batches(self.data, self.info, self.augment, seed)
        loader = DataLoader(
            dataset,
            sampler=_Parts(batches, part),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for x, y in loader:  # uint8 crosses to the device: a quarter of float32's bytes
            yield self.transform(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)


class _Parts:
    """(global batch, this worker's slice) pairs, drawn lazily from a batch sampler."""

    def __init__(self, batches: BatchSampler, part: slice) -> None:
        self.batches, self.part = batches, part

    def __iter__(self):
        return ((b, self.part) for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)
