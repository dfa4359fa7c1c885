"""Batches from .beton files through FFCV (`data.loader: ffcv`, the default).

Same contract as the torch path (`BatchLoader`): training takes the same per-epoch permutation
(seeded from `train.seed` and the epoch, so a resumed run reads the same order), cuts it into global
batches and gives each rank its equal slice, so every rank reads a disjoint shard and 2 workers x b
see what 1 worker x 2b sees; the last partial global batch is dropped (equal steps on every rank).
FFCV's own distributed order (a DistributedSampler) pads the shards with repeated samples and
shuffles with a different generator, so the order is ours and FFCV does the reading, decoding,
augmentation and, on GPU, the transfer. Evaluation: a contiguous 1/world of the split per rank.

Pipelines: decode -> augment (seeded, below) -> ToTensor -> [ToDevice(non_blocking) ->
ToTorchImage(channels_last) on GPU] -> `InputTransform` on the device (normalise, pad, channels).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from numba import njit

from distswitch.data.beton import BetonSet, import_ffcv
from distswitch.data.datasets import batch_share
from distswitch.data.transform import InputTransform

import_ffcv()  # before any ffcv module: see there
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, NDArrayDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder


@njit(nogil=True)
def _mix(z):
    """splitmix64: a well-spread 64-bit hash, so draws need no shared RNG state between threads."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class SeededCropFlip(Operation):
    """Random crop with zero padding `pad` (0 = none) and horizontal flip, on uint8 HxWxC batches.

    FFCV's RandomTranslate / RandomHorizontalFlip draw from numba's unseeded global RNG, so a resumed
    run would see other augmentations. Here each example's draw is a hash of (seed, its index, the
    first index of its batch): fixed by the order, which is fixed by (seed, epoch).
    """

    def __init__(self, pad: int, seed: int) -> None:
        super().__init__()
        self.pad, self.seed = pad, seed

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        pad, seed = self.pad, np.uint64(self.seed)
        span = np.uint64(2 * pad + 1)
        mix = _mix

        def crop_flip(images, dst, indices):
            n, h, w, c = images.shape
            key = mix(seed ^ mix(np.uint64(indices[0])))
            for i in my_range(n):
                r = mix(key ^ np.uint64(indices[i]))
                dy = np.int64(r % span) - pad
                dx = np.int64((r >> np.uint64(20)) % span) - pad
                flip = (r >> np.uint64(40)) & np.uint64(1)
                for y in range(h):
                    sy = y + dy
                    for x in range(w):
                        sx = (w - 1 - x if flip else x) + dx
                        if 0 <= sy < h and 0 <= sx < w:
                            dst[i, y, x] = images[i, sy, sx]
                        else:
                            dst[i, y, x] = 0
            return dst

        crop_flip.is_parallel = True
        crop_flip.with_indices = True
        return crop_flip

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class _Order(TraversalOrder):
    """Training: this rank's slice of every global batch of a seeded permutation. Evaluation: this
    rank's contiguous share, in order. (FFCV only calls `sample_order`; its base __init__, which
    reads a built Loader, is not needed.)"""

    def __init__(self, base: np.ndarray, train: bool, seed: int, global_batch: int, rank: int, world_size: int) -> None:
        self.base, self.train, self.seed = base, train, seed
        self.global_batch, self.rank, self.world = global_batch, rank, world_size

    def sample_order(self, epoch: int) -> np.ndarray:
        n, w, r = len(self.base), self.world, self.rank
        if not self.train:
            return self.base[n * r // w : n * (r + 1) // w]
        # torch.randperm with this seed: the permutation the torch path's RandomSampler draws.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 10_007 + epoch)).numpy()
        steps = n // self.global_batch
        mine = perm[: steps * self.global_batch].reshape(steps, self.global_batch)[
            :, batch_share(self.global_batch, r, w)
        ]
        return self.base[mine.reshape(-1)]


class FfcvLoader:
    """Iterates (images [B, C, H, W] normalised on `device`, labels int64 [B]) over one rank's share
    of a .beton split; `batch_size` is the global batch when training (see module docstring).

    The FFCV Loader is built (its pipeline generated and compiled, about 2 s each on a small CPU) at
    the first iteration, so the validation and test loaders do not delay the first training step."""

    def __init__(
        self,
        betons: BetonSet,
        split: str,
        batch_size: int,
        train: bool,
        transform: InputTransform,
        seed: int = 0,
        augment: bool = True,
        threads: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        limit: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.betons, self.split, self.transform, self.train = betons, split, transform, train
        self.augment, self.seed, self.threads, self.epoch = augment, seed, threads, 0
        count = betons.count(split) if limit is None else min(limit, betons.count(split))
        self.order = _Order(np.arange(count, dtype=np.uint64), train, seed, batch_size, rank, world_size)
        part = batch_share(batch_size, rank, world_size)
        self.local_batch = part.stop - part.start if train else batch_size
        n = len(self.order.sample_order(0))  # the same length every epoch: computed once
        self._len = n // self.local_batch if train else -(-n // self.local_batch)
        self._loader: Loader | None = None

    def _build(self) -> Loader:
        on_gpu, info = self.device.type == "cuda", self.betons.info
        image: list = []
        if info.augment == "resized_crop":  # imagefolder: decode straight to the model's size
            size = self.transform.target.image_size
            image.append(
                RandomResizedCropRGBImageDecoder((size, size))
                if self.train
                else CenterCropRGBImageDecoder((size, size), ratio=224 / 256)
            )
        else:
            image.append(NDArrayDecoder())
        if self.train and self.augment and info.augment in ("crop_flip", "resized_crop"):
            image.append(SeededCropFlip(pad=4 if info.augment == "crop_flip" else 0, seed=self.seed))
        image.append(ToTensor())
        label: list = [IntDecoder(), ToTensor()]
        if on_gpu:
            image.append(ToDevice(self.device, non_blocking=True))
            label.append(ToDevice(self.device, non_blocking=True))
        image.append(ToTorchImage(channels_last=on_gpu))
        loader = Loader(
            str(self.betons.path(self.split)),
            batch_size=self.local_batch,
            num_workers=self.threads or _cores_per_worker(),
            order=OrderOption.SEQUENTIAL,
            indices=self.order.base,
            drop_last=self.train,
            pipelines={"image": image, "label": label},
        )
        # FFCV 1.0.2 cannot take a TraversalOrder subclass through its constructor (it checks
        # isinstance on the class), so the order is set afterwards; __len__ reads first_traversal_order.
        loader.traversal_order = self.order
        loader.first_traversal_order = self.order.sample_order(0)
        return loader

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        if self._loader is None:
            self._loader = self._build()
        self._loader.next_epoch = self.epoch
        for x, y in self._loader:
            # FFCV reuses its batch buffers: the labels are copied (the images are by the transform).
            yield self.transform(x), y.reshape(-1).to(torch.int64, copy=True)


def _cores_per_worker() -> int:
    """This worker's share of the cores it may run on (Ray Train and torchrun set LOCAL_WORLD_SIZE)."""
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
