""".beton preparation and the FFCV loader: same split and order as the torch path, reproducible,
atomic, and clear errors for folders that do not match the config."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, indexed_mnist, make_config
from distswitch.cli import main
from distswitch.data import make_loaders
from distswitch.data.beton import open_betons, prepare
from distswitch.data.datasets import DataError, split_indices


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def sample_ids(x: torch.Tensor) -> list[int]:
    """Back from raw uint8 images to the indices `indexed_mnist` wrote into them."""
    return (x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist()


def _quiet(line: str) -> None:
    pass


@pytest.fixture
def mnist_betons(tmp_path: Path) -> tuple[Path, Path]:
    root = indexed_mnist(tmp_path / "mnist", 300, 50)
    out = tmp_path / "betons"
    prepare("mnist", out, root=str(root), val_size=40, log=_quiet)
    return root, out


def _cfg(out: Path, root: Path, **data) -> object:
    return make_config(
        data={"dataset": "mnist", "root": str(root), "beton_dir": str(out), "val_size": 40, **data},
        train={"batch_size": 32, "eval_batch_size": 16},
    )


# -- preparing ----------------------------------------------------------------------------------------


def test_prepare_writes_train_val_test_and_metadata_with_counts_checksum_and_split(mnist_betons):
    _, out = mnist_betons
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["counts"] == {"train": 260, "val": 40, "test": 50}
    assert meta["split"] == {"val_size": 40, "split_seed": 0}
    assert meta["image_shape"] == [1, 28, 28] and meta["info"]["num_classes"] == 10
    assert len(meta["source"]["sha256"]) == 64 and meta["info"]["mean"] and meta["info"]["std"]
    for split in ("train", "val", "test"):
        assert (out / f"{split}.beton").stat().st_size == meta["files"][split]["bytes"]


def test_prepare_again_with_the_same_inputs_writes_nothing(mnist_betons, capsys):
    root, out = mnist_betons
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    status = main(["data", "prepare", "mnist", "--out", str(out), "--root", str(root), "--val-size", "40"])
    assert status == 0 and "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_prepare_rewrites_when_the_split_changes(mnist_betons):
    root, out = mnist_betons
    meta, written = prepare("mnist", out, root=str(root), val_size=30, log=_quiet)
    assert written and meta["counts"]["val"] == 30


def test_ffcv_loaders_give_the_torch_paths_batches_in_the_same_order(mnist_betons):
    root, out = mnist_betons
    ffcv, torch_path = make_loaders(_cfg(out, root, loader="ffcv")), make_loaders(_cfg(out, root, loader="torch"))
    for split in ("train", "val", "test"):
        pairs = list(zip(getattr(ffcv, split), getattr(torch_path, split)))
        assert len(pairs) == len(getattr(torch_path, split)) > 1
        for (xf, yf), (xt, yt) in pairs:
            assert torch.equal(xf, xt) and torch.equal(yf, yt)


def cifar_batches(root: Path, name: str, n_train: int, n_test: int) -> Path:
    """CIFAR's python-batch layout (what torchvision's download unpacks): image i of a split has its
    red plane at i % 256, green at class * 10, blue at 200; labels i % classes."""
    import pickle

    classes = 10 if name == "cifar10" else 100
    folder, train_files, test_file, meta, names_key, labels_key = (
        (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            "batches.meta",
            "label_names",
            "labels",
        )
        if name == "cifar10"
        else ("cifar-100-python", ["train"], "test", "meta", "fine_label_names", "fine_labels")
    )
    base = root / folder
    base.mkdir(parents=True)

    def batch(ids: np.ndarray) -> dict:
        labels = ids % classes
        planes = np.stack(
            [
                np.broadcast_to(v[:, None], (len(ids), 1024))
                for v in (ids % 256, labels * 10 % 256, np.full(len(ids), 200))
            ],
            1,
        )
        return {"data": planes.reshape(len(ids), 3072).astype(np.uint8), labels_key: labels.tolist()}

    for part, ids in zip(train_files, np.array_split(np.arange(n_train), len(train_files))):
        (base / part).write_bytes(pickle.dumps(batch(ids)))
    (base / test_file).write_bytes(pickle.dumps(batch(np.arange(n_test))))
    (base / meta).write_bytes(pickle.dumps({names_key: [f"class{c}" for c in range(classes)]}))
    return root


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_batches_are_prepared_as_rgb_32x32_with_their_classes_and_read_alike_by_both_loaders(tmp_path, name):
    root, out = cifar_batches(tmp_path / name, name, 250, 40), tmp_path / "betons"
    meta, written = prepare(name, out, root=str(root), val_size=50, log=_quiet)
    assert written and meta["counts"] == {"train": 200, "val": 50, "test": 40}
    assert meta["image_shape"] == [3, 32, 32] and meta["info"]["augment"] == "crop_flip"
    assert len(meta["info"]["classes"]) == meta["info"]["num_classes"] == (10 if name == "cifar10" else 100)
    cfg = dict(dataset=name, root=str(root), beton_dir=str(out), val_size=50)
    loaders = {
        kind: make_loaders(make_config(data={**cfg, "loader": kind}, train={"batch_size": 20, "eval_batch_size": 20}))
        for kind in ("ffcv", "torch")
    }
    (x, y), (xt, yt) = next(iter(loaders["ffcv"].test)), next(iter(loaders["torch"].test))
    assert torch.equal(x, xt) and torch.equal(y, yt) and x.shape == (20, 3, 32, 32)
    # Planes are R, G, B: test image i has red i, green its class * 10, blue 200 (before normalising).
    pixels = (
        x * torch.tensor(meta["info"]["std"]).view(1, 3, 1, 1) + torch.tensor(meta["info"]["mean"]).view(1, 3, 1, 1)
    ) * 255
    expected = torch.stack(
        [torch.arange(20.0), (torch.arange(20) % meta["info"]["num_classes"]) * 10.0, torch.full((20,), 200.0)], 1
    )
    assert torch.allclose(pixels[:, :, 16, 16], expected, atol=0.01) and torch.equal(
        y, torch.arange(20) % meta["info"]["num_classes"]
    )
    xb, _ = next(iter(loaders["ffcv"].train))
    assert xb.shape == (20, 3, 32, 32)


def test_a_damaged_cifar_batch_is_named_in_one_line(tmp_path):
    root = cifar_batches(tmp_path / "c", "cifar10", 50, 10)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04 truncated")
    with pytest.raises(DataError, match="data_batch_3.*cannot be read as a CIFAR batch"):
        prepare("cifar10", tmp_path / "out", root=str(root), val_size=10, log=_quiet)
    shutil.rmtree(root / "cifar-10-batches-py")
    with pytest.raises(DataError, match="no cifar10 batches under .*data.download=true"):
        prepare("cifar10", tmp_path / "out", root=str(root), val_size=10, log=_quiet)


def test_killed_prepare_leaves_no_folder_that_looks_complete(tmp_path, fashion_mnist_root):
    out = tmp_path / "fm"
    code = f"from distswitch.data.beton import prepare; prepare('fashion-mnist', {str(out)!r}, workers=1)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not list(out.glob(".train.*.tmp.beton")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "prepare finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # with FFCV's writer processes, which would outlive their parent
    proc.wait()
    assert not (out / "metadata.json").exists() and not (out / "train.beton").exists()
    with pytest.raises(DataError, match="metadata.json missing"):
        open_betons(make_config(data={"beton_dir": str(out)}).data)
    _, written = prepare("fashion-mnist", out, log=_quiet)  # the next run starts clean and completes
    assert written and not list(out.glob(".*.tmp*"))
    assert open_betons(make_config(data={"beton_dir": str(out)}).data).count("train") == 55000


# -- loading ------------------------------------------------------------------------------------------


def test_resumed_epoch_reads_the_same_order_and_epochs_differ(mnist_betons):
    root, out = mnist_betons
    from distswitch.data.ffcv_loader import FfcvLoader

    betons = open_betons(_cfg(out, root).data)

    def order(epoch: int) -> list[int]:
        loader = FfcvLoader(betons, "train", 32, True, identity, seed=3)
        loader.set_epoch(epoch)
        return [i for x, _ in loader for i in sample_ids(x)]

    assert order(2) == order(2)
    assert order(2) != order(3)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_shards_that_cover_the_split(mnist_betons, world):
    root, out = mnist_betons
    from distswitch.data.ffcv_loader import FfcvLoader

    betons = open_betons(_cfg(out, root).data)
    train = [
        [
            i
            for x, _ in FfcvLoader(betons, "train", 30 * world, True, identity, rank=r, world_size=world)
            for i in sample_ids(x)
        ]
        for r in range(world)
    ]
    whole = [i for x, _ in FfcvLoader(betons, "train", 30 * world, True, identity) for i in sample_ids(x)]
    assert all(len(t) == len(train[0]) for t in train)  # equal steps on every rank
    assert set().union(*map(set, train)) == set(whole) and sum(map(len, train)) == len(whole) == len(set(whole))
    assert 260 - len(whole) < 30 * world  # only the last partial global batch is left out
    val = [
        [i for x, _ in FfcvLoader(betons, "val", 16, False, identity, rank=r, world_size=world) for i in sample_ids(x)]
        for r in range(world)
    ]
    assert sorted(i for v in val for i in v) == sorted(set(i for v in val for i in v)) and sum(map(len, val)) == 40


def test_grayscale_can_be_shown_to_a_model_as_3x32x32(mnist_betons):
    root, out = mnist_betons
    loaders = make_loaders(_cfg(out, root, channels=3, image_size=32))
    x, _ = next(iter(loaders.val))
    assert x.shape[1:] == (3, 32, 32) and loaders.info.channels == 3 and loaders.info.image_size == 32
    black = (0 - loaders.info.mean[0]) / loaders.info.std[0]
    assert torch.allclose(x[:, :, :2, :], torch.tensor(black)) and torch.equal(x[:, 0], x[:, 2])


def test_seeded_crop_flip_is_reproducible_and_each_image_is_a_padded_crop_or_flip(tmp_path):
    from ffcv.fields import IntField, NDArrayField
    from ffcv.fields.decoders import NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    from ffcv.writer import DatasetWriter

    from distswitch.data.ffcv_loader import SeededCropFlip

    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (64, 8, 8, 3)).astype(np.uint8)  # no zeros: padding is recognisable
    path = tmp_path / "tiny.beton"
    DatasetWriter(
        str(path), {"image": NDArrayField(np.dtype("uint8"), (8, 8, 3)), "label": IntField()}, num_workers=1
    ).from_indexed_dataset([(im, 0) for im in images])

    def run(seed: int) -> np.ndarray:
        loader = Loader(
            str(path),
            batch_size=16,
            num_workers=1,
            order=OrderOption.SEQUENTIAL,
            pipelines={"image": [NDArrayDecoder(), SeededCropFlip(pad=2, seed=seed), ToTensor()], "label": None},
        )
        return np.concatenate([x.numpy().copy() for (x,) in loader])

    a = run(7)
    assert np.array_equal(a, run(7)) and not np.array_equal(a, run(8))
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i, out in enumerate(a):
        candidates = [
            c
            for dy in range(5)
            for dx in range(5)
            for c in (padded[i, dy : dy + 8, dx : dx + 8], padded[i, dy : dy + 8, dx : dx + 8][:, ::-1])
        ]
        flipped_crops = [padded[i, dy : dy + 8, :, :][:, ::-1][:, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(out, c) for c in candidates + flipped_crops), f"image {i} is not a crop/flip"
    assert len({a[i].tobytes() for i in range(64)} & {images[i].tobytes() for i in range(64)}) < 64


# -- errors -------------------------------------------------------------------------------------------


def _error(capsys, *args: str) -> str:
    capsys.readouterr()  # drop the fixtures' output (FFCV's writer progress)
    status = main(["train", *args, "train.progress=false"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def cli_args(mnist_betons, config_file, tmp_path):
    root, out = mnist_betons
    return [
        str(config_file),
        "data.dataset=mnist",
        f"data.root={root}",
        f"data.beton_dir={out}",
        "data.val_size=40",
        "train.batch_size=32",
        f"out_dir={tmp_path / 'run'}",
    ], out


def test_missing_beton_folder_says_how_to_prepare(capsys, cli_args, tmp_path):
    args, _ = cli_args
    line = _error(capsys, *args, f"data.beton_dir={tmp_path / 'nowhere'}")
    assert "distswitch data prepare mnist --out" in line


def test_truncated_beton_is_refused(capsys, cli_args):
    args, out = cli_args
    with open(out / "train.beton", "r+b") as fh:
        fh.truncate(fh.seek(0, os.SEEK_END) // 2)
    assert "truncated" in _error(capsys, *args)


def test_foreign_file_in_place_of_a_beton_is_refused(capsys, cli_args):
    args, out = cli_args
    size = (out / "val.beton").stat().st_size
    (out / "val.beton").write_bytes(np.random.default_rng(0).integers(0, 256, size).astype(np.uint8).tobytes())
    assert "not a readable .beton" in _error(capsys, *args)


def test_betons_of_another_dataset_are_refused(capsys, cli_args):
    args, _ = cli_args
    assert "holds mnist" in _error(capsys, *args, "data.dataset=fashion-mnist", "data.root=null")


def test_betons_prepared_with_another_split_are_refused(capsys, cli_args):
    args, _ = cli_args
    assert "--val-size 50" in _error(capsys, *args, "data.val_size=50")


def test_a_model_shape_the_data_cannot_give_is_refused(capsys, cli_args):
    args, _ = cli_args
    assert "data.image_size" in _error(capsys, *args, "data.image_size=16")


# -- imagefolder --------------------------------------------------------------------------------------


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """ROOT/train/<class>/*.png and ROOT/val/<class>/*.jpg (ImageNet's layout), 3 classes of
    differently sized images whose colour follows the class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    for split, n, suffix in (("train", 20, ".png"), ("val", 5, ".jpg")):
        for c, name in enumerate(("ant", "bee", "cat")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(30, 60, 2)
                pixels = rng.integers(0, 60, (h, w, 3)) + np.array([180 if k == c else 0 for k in range(3)])
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}{suffix}")
    return root


def test_imagefolder_is_prepared_and_trains_at_the_configured_crop(image_tree, tmp_path):
    from distswitch.worker import train

    out = tmp_path / "betons"
    meta, _ = prepare("imagefolder", out, root=str(image_tree), val_size=6, log=_quiet)
    assert meta["counts"] == {"train": 54, "val": 6, "test": 15}
    assert meta["info"]["classes"] == ["ant", "bee", "cat"] and meta["info"]["augment"] == "resized_crop"
    # Each class lifts one channel by 180/255 over noise in [0, 60): a third of the images per channel.
    assert all(0.2 < m < 0.4 for m in meta["info"]["mean"]) and all(s > 0.2 for s in meta["info"]["std"])
    cfg = make_config(
        model={"name": "lenet5"},
        method="dense",
        data={"dataset": "imagefolder", "beton_dir": str(out), "val_size": 6, "image_size": 32},
        train={"epochs": 1, "batch_size": 18, "eval_batch_size": 8},
        out_dir=str(tmp_path / "run"),
    )
    loaders = make_loaders(cfg)
    x, y = next(iter(loaders.train))
    assert x.shape == (18, 3, 32, 32) and y.shape == (18,) and set(y.tolist()) <= {0, 1, 2}
    summary = train(cfg)
    assert summary["dataset"] == "imagefolder" and 0 <= summary["test_acc"] <= 1


def test_imagefolder_without_a_test_split_is_refused(image_tree, capsys):
    shutil.rmtree(image_tree / "val")
    status = main(["data", "prepare", "imagefolder", "--root", str(image_tree), "--out", str(image_tree / "b")])
    assert status == 2 and "train/ and test/ (or val/)" in capsys.readouterr().err


def test_the_launchers_beton_header_reader_matches_ffcvs_format():
    import ffcv.types

    from distswitch.data import beton

    assert beton.HEADER == ffcv.types.HeaderType and beton.FIELD_DESC == ffcv.types.FieldDescType
    assert beton.BETON_VERSION == ffcv.types.CURRENT_VERSION


def test_importing_ffcv_through_distswitch_compiles_nothing_and_leaves_numba_intact():
    # A fresh interpreter: this session may have imported ffcv already.
    code = """
import numba.core.dispatcher as d
compiled = []
real = d.Dispatcher.compile
d.Dispatcher.compile = lambda self, sig: compiled.append(self.py_func.__name__) or real(self, sig)
from distswitch.data.beton import import_ffcv
import_ffcv()
import numba.typed, numba.typed.typeddict, ffcv.fields.rgb_image as rgb
assert compiled == [], compiled
assert numba.typed.Dict is numba.typed.typeddict.Dict
assert dict(rgb.IMAGE_MODES) == {"jpg": 0, "raw": 1}
import distswitch.data.ffcv_loader
assert compiled == [], compiled
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def _shard_worker(config: dict) -> None:
    """A Ray Train worker: record the sample ids this rank reads (train epochs 0-1, val)."""
    import ray.train

    from distswitch.config import DataConfig
    from distswitch.data.beton import open_betons
    from distswitch.data.ffcv_loader import FfcvLoader, _cores_per_worker

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    betons = open_betons(DataConfig(**config["data"]))
    seen = {"threads": _cores_per_worker()}
    for epoch in (0, 1):
        loader = FfcvLoader(betons, "train", 60, True, identity, seed=0, rank=rank, world_size=world)
        loader.set_epoch(epoch)
        seen[f"train{epoch}"] = [i for x, _ in loader for i in sample_ids(x)]
    seen["val"] = [
        i for x, _ in FfcvLoader(betons, "val", 16, False, identity, rank=rank, world_size=world) for i in sample_ids(x)
    ]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow
def test_two_ray_workers_read_disjoint_shards_that_cover_each_epoch(mnist_betons, tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    root, out = mnist_betons
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        TorchTrainer(
            _shard_worker,
            scaling_config=ScalingConfig(num_workers=2),
            train_loop_config={
                "data": {"dataset": "mnist", "root": str(root), "beton_dir": str(out), "val_size": 40},
                "out": str(tmp_path),
            },
            run_config=RunConfig(name="shards", storage_path=str(tmp_path / "ray")),
        ).fit()
    finally:
        ray.shutdown()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key in ("train0", "train1"):
        a, b = (set(r[key]) for r in ranks)
        assert not a & b and len(a) == len(b) == 120  # 260 // 60 global batches of 30 per rank
        assert len(a | b) == 240 and (a | b) <= set(split_indices(300, 40, 0)[0].tolist())  # ids of the train split
    assert ranks[0]["train0"] != ranks[0]["train1"]  # a new order each epoch
    val = [set(r["val"]) for r in ranks]
    assert not val[0] & val[1] and val[0] | val[1] == set(split_indices(300, 40, 0)[1].tolist())
    assert all(r["threads"] == 1 for r in ranks)  # 2 cores shared by 2 workers
