"""The three loaders a run needs (train / val / test for one rank), from `data.loader`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distswitch.config import Config, channels_last_on
from distswitch.data.datasets import DatasetInfo, check_batch, input_info, load_splits
from distswitch.data.transform import AUTOCAST_DTYPES, InputTransform


@dataclass
class Loaders:
    train: object  # BatchLoader | FfcvLoader: set_epoch, __len__, __iter__ -> (x, y)
    val: object
    test: object
    info: DatasetInfo  # what the model sees (after data.channels / data.image_size)
    train_examples: int  # in the training split (after data.train_limit)

    def example(self, n: int = 8) -> torch.Tensor:
        """A few real validation inputs (export: MAC counts, model signature)."""
        return next(iter(self.val))[0][:n]


def make_loaders(cfg: Config, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu") -> Loaders:
    data, train = cfg.data, cfg.train
    source, store, n_train = _open(cfg, world_size)
    target = input_info(source, data.channels, data.image_size)
    # Under autocast the first layer casts its input anyway: normalising straight to that dtype
    # halves the batch's memory traffic (the NormalizeImage(fp16/bf16) step).
    dtype = AUTOCAST_DTYPES[train.precision] or torch.float32
    layout = torch.channels_last if channels_last_on(train) else torch.contiguous_format
    transform = InputTransform(source, target, dtype, layout)
    common = {"rank": rank, "world_size": world_size, "device": device, "transform": transform}
    if data.loader == "ffcv":
        from distswitch.data.ffcv_loader import FfcvLoader

        threads = {"threads": data.num_workers}
        return Loaders(
            FfcvLoader(
                store,
                "train",
                train.batch_size,
                True,
                seed=train.seed,
                augment=data.augment,
                limit=data.train_limit,
                **threads,
                **common,
            ),
            FfcvLoader(store, "val", train.eval_batch_size, False, **threads, **common),
            FfcvLoader(store, "test", train.eval_batch_size, False, **threads, **common),
            target,
            n_train,
        )
    from distswitch.data.torch_loader import BatchLoader

    return Loaders(
        BatchLoader(
            store.train,
            source,
            train.batch_size,
            True,
            seed=train.seed,
            augment=data.augment,
            num_workers=data.num_workers,
            **common,
        ),
        BatchLoader(store.val, source, train.eval_batch_size, False, **common),
        BatchLoader(store.test, source, train.eval_batch_size, False, **common),
        target,
        n_train,
    )


def check_data(cfg: Config, world_size: int) -> tuple[DatasetInfo, int]:
    """Everything `make_loaders` would refuse, without building loaders (FFCV compiles its
    pipelines, seconds each): (the model's input info, training steps per epoch)."""
    source, _, n_train = _open(cfg, world_size)
    return input_info(source, cfg.data.channels, cfg.data.image_size), n_train // cfg.train.batch_size


def _open(cfg: Config, world_size: int):
    """(source info, BetonSet or Splits, training examples), with the batch checked against them."""
    if cfg.data.loader == "ffcv":
        from distswitch.data.beton import open_betons

        store = open_betons(cfg.data)
        source, n_train = store.info, store.count("train")
    else:
        store = load_splits(cfg.data)
        source, n_train = store.info, len(store.train)
    if cfg.data.train_limit is not None:
        n_train = min(n_train, cfg.data.train_limit)
    check_batch(cfg.train.batch_size, n_train, world_size)
    return source, store, n_train
