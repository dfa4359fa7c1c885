"""Images/s of FFCV against torch's DataLoader: 32x32 RGB, random crop (padding 4) + horizontal flip,
normalised float32 batches of 512, the same cores, several epochs, all in this one process.

The images are Fashion-MNIST's 55,000 training images as 3x32x32 (padded with black, the grey
channel replicated): real pixels, stored the way `distswitch data prepare` stores CIFAR (raw uint8).
Loaders compared:
  ffcv             distswitch's FfcvLoader (FFCV reads, decodes and augments in numba threads)
  dataloader       the usual torch pipeline: a per-sample Dataset with torchvision transforms
                   (RandomCrop, RandomHorizontalFlip, Normalize) under DataLoader worker processes
  distswitch-torch distswitch's own torch path (`data.loader: torch`): whole-batch tensor indexing

Every loader gets `--cores` (FFCV threads, DataLoader workers). Epoch 1 includes FFCV's JIT compile
and DataLoader's worker start; the ratio uses the mean of the later epochs and is also given with
epoch 1 included.

    uv run python benchmarks/data_loading.py --out outputs/bench/data_loading.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distswitch.config import DataConfig
from distswitch.data.beton import BetonSet
from distswitch.data.datasets import ArrayDataset, DatasetInfo, load_splits
from distswitch.data.ffcv_loader import FfcvLoader
from distswitch.data.torch_loader import BatchLoader
from distswitch.data.transform import InputTransform

INFO = DatasetInfo("fashion-mnist-rgb32", 10, 3, 32, (0.2860,) * 3, (0.3530,) * 3, "crop_flip")


def rgb32(limit: int | None) -> ArrayDataset:
    train = load_splits(DataConfig(dataset="fashion-mnist", loader="torch")).train
    if limit:
        train = ArrayDataset(train.images[:limit], train.labels[:limit])
    images = F.pad(train.images, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
    return ArrayDataset(images, train.labels)


def write_beton(data: ArrayDataset, folder: Path) -> BetonSet:
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    hwc = data.images.permute(0, 2, 3, 1).contiguous().numpy()
    labels = data.labels.numpy()
    path = folder / "train.beton"
    DatasetWriter(
        str(path),
        {"image": NDArrayField(np.dtype("uint8"), (32, 32, 3)), "label": IntField()},
        page_size=1 << 21,
        num_workers=2,
    ).from_indexed_dataset([(hwc[i], int(labels[i])) for i in range(len(labels))])
    meta = {"files": {"train": {"name": "train.beton"}}, "counts": {"train": len(labels)}}
    return BetonSet(folder, meta, INFO)


class PerSample(torch.utils.data.Dataset):
    """The conventional pipeline: one example at a time through torchvision transforms."""

    def __init__(self, data: ArrayDataset) -> None:
        from torchvision.transforms import v2

        self.data = data
        self.transform = v2.Compose(
            [
                v2.RandomCrop(32, padding=4),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(INFO.mean, INFO.std),
            ]
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.transform(self.data.images[i]), self.data.labels[i]


def loaders(data: ArrayDataset, betons: BetonSet, batch: int, cores: int) -> dict:
    transform = InputTransform(INFO, INFO)
    return {
        "ffcv": FfcvLoader(betons, "train", batch, True, transform, threads=cores),
        "dataloader": torch.utils.data.DataLoader(
            PerSample(data), batch_size=batch, shuffle=True, drop_last=True, num_workers=cores, persistent_workers=False
        ),
        "distswitch-torch": BatchLoader(data, INFO, batch, True, num_workers=cores),
    }


def measure(loader, epochs: int) -> tuple[list[int], list[float]]:
    """Images and seconds per epoch."""
    images, seconds = [], []
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for x, y in loader:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
            n += len(y)
        images.append(n)
        seconds.append(time.perf_counter() - start)
    return images, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--limit", type=int, help="use the first N training images (CI's reduced run)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.cores)
    data = rgb32(args.limit)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        betons = write_beton(data, Path(tmp))
        results = {}
        for name, loader in loaders(data, betons, args.batch, args.cores).items():
            images, seconds = measure(loader, args.epochs)
            rates = [n / t for n, t in zip(images, seconds)]
            later = slice(1, None) if args.epochs > 1 else slice(None)
            results[name] = {
                "images_per_s": rates,
                "seconds": seconds,
                "steady": sum(images[later]) / sum(seconds[later]),
                "with_first_epoch": sum(images) / sum(seconds),
            }
            print(
                f"{name:17s} "
                + " ".join(f"{r:9.0f}" for r in rates)
                + f"   steady {results[name]['steady']:9.0f} img/s",
                flush=True,
            )
    base = results["dataloader"]
    report = {
        "images": len(data),
        "batch": args.batch,
        "epochs": args.epochs,
        "cores": args.cores,
        "results": results,
        "ratio_ffcv_vs_dataloader": results["ffcv"]["steady"] / base["steady"],
        "ratio_ffcv_vs_dataloader_with_first_epoch": results["ffcv"]["with_first_epoch"] / base["with_first_epoch"],
        "ratio_ffcv_vs_distswitch_torch": results["ffcv"]["steady"] / results["distswitch-torch"]["steady"],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(
        f"FFCV / DataLoader: {report['ratio_ffcv_vs_dataloader']:.1f}x (epochs 2+), "
        f"{report['ratio_ffcv_vs_dataloader_with_first_epoch']:.1f}x (all epochs); "
        f"FFCV / distswitch torch path: {report['ratio_ffcv_vs_distswitch_torch']:.1f}x"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
