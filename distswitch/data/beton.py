"""`distswitch data prepare`: a dataset -> train / val / test .beton files + metadata.json, and the
checks a folder of them must pass before a loader opens it.

The val split is carved from the training set exactly as the torch path carves it
(`split_indices`), so both loaders train and select on the same examples. Array datasets (the
MNISTs, CIFAR) are stored raw as uint8 HxWxC; imagefolder trees as FFCV RGB images (JPEG when that
is smaller, `max_resolution` on the longer side). Files are written under temporary names and
renamed when complete, and metadata.json is written last: a folder without it is never taken as
prepared, whatever was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from distswitch.config import DataConfig
from distswitch.data.datasets import DATASETS, DataError, DatasetInfo, split_indices
from distswitch.io import atomic_path, write_json

FORMAT = "distswitch.beton/1"
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
MEAN_STD_SAMPLE = 2000  # imagefolder: images read to estimate the channel mean / std


def import_ffcv() -> None:
    """Import ffcv without its ~4 CPU-seconds of import-time JIT.

    `ffcv.fields.rgb_image` fills a numba typed Dict at import, which compiles numba's dict code in
    every process that imports ffcv: each Ray worker, at each start. That dict is only ever read
    from Python (the decoders copy its ints into their closures), so a plain dict stands in for
    `numba.typed.Dict` during the import. The real one is back as soon as ffcv is imported.
    """
    if "ffcv.fields.rgb_image" in sys.modules:
        return
    import numba.typed

    numba.typed.Dict = dict  # numba.typed resolves Dict lazily (module __getattr__): shadow it ...
    try:
        import ffcv  # noqa: F401
    finally:
        del numba.typed.Dict  # ... and unshadow it


def default_dir(dataset: str) -> str:
    return f"data/ffcv/{dataset}"


@dataclass(frozen=True)
class BetonSet:
    """A prepared folder, checked against the config: paths, counts and the stored DatasetInfo."""

    folder: Path
    meta: dict
    info: DatasetInfo

    def path(self, split: str) -> Path:
        return self.folder / self.meta["files"][split]["name"]

    def count(self, split: str) -> int:
        return int(self.meta["counts"][split])


def open_betons(cfg: DataConfig) -> BetonSet:
    """The prepared files for `cfg`, or a DataError saying what is wrong and how to fix it."""
    folder = Path(cfg.beton_dir or default_dir(cfg.dataset))
    prepare_cmd = f"`distswitch data prepare {cfg.dataset} --out {folder}`"
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        raise DataError(
            f"data.beton_dir: no prepared dataset in {str(folder)!r} (metadata.json missing); run {prepare_cmd}"
        )
    try:
        meta = json.loads(meta_path.read_text())
        stored_format = meta.get("format")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"data.beton_dir: {meta_path} is unreadable ({exc}); run {prepare_cmd} again") from None
    if stored_format != FORMAT:
        raise DataError(
            f"data.beton_dir: {meta_path} is format {stored_format!r}, not {FORMAT!r}; run {prepare_cmd} again"
        )
    if meta["dataset"] != cfg.dataset:
        raise DataError(
            f"data.beton_dir: {str(folder)!r} holds {meta['dataset']}, but data.dataset is {cfg.dataset}; "
            f"point data.beton_dir at a {cfg.dataset} folder or run {prepare_cmd}"
        )
    split = meta["split"]
    if (split["val_size"], split["split_seed"]) != (cfg.val_size, cfg.split_seed):
        raise DataError(
            f"data.val_size/split_seed: {str(folder)!r} was prepared with val_size {split['val_size']}, split_seed "
            f"{split['split_seed']}, the config asks {cfg.val_size}, {cfg.split_seed}; set those or run "
            f"`distswitch data prepare {cfg.dataset} --out {folder} --val-size {cfg.val_size} --split-seed {cfg.split_seed}`"
        )
    for name in SPLITS:
        _check_file(folder, meta, name, prepare_cmd)
    info = DatasetInfo(
        **{
            **meta["info"],
            "mean": tuple(meta["info"]["mean"]),
            "std": tuple(meta["info"]["std"]),
            "classes": tuple(meta["info"]["classes"]),
        }
    )
    return BetonSet(folder, meta, info)


def _check_file(folder: Path, meta: dict, split: str, prepare_cmd: str) -> None:
    entry = meta["files"][split]
    path = folder / entry["name"]
    if not path.is_file():
        raise DataError(f"data.beton_dir: {path} is missing; run {prepare_cmd} again")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DataError(
            f"data.beton_dir: {path} has {size} bytes, metadata.json says {entry['bytes']} "
            f"(truncated or replaced); run {prepare_cmd} again"
        )
    try:
        fields, samples = beton_header(path)
    except ValueError as exc:
        raise DataError(f"data.beton_dir: {path} is not a readable .beton ({exc}); run {prepare_cmd} again") from None
    if fields != ["image", "label"] or samples != meta["counts"][split]:
        raise DataError(
            f"data.beton_dir: {path} holds fields {fields} and {samples} samples, metadata.json says "
            f"['image', 'label'] and {meta['counts'][split]}; run {prepare_cmd} again"
        )


# FFCV's .beton header (format version 2, ffcv/types.py), read here without importing FFCV: its
# import takes ~5 s on a small CPU (numba), too much for the launcher's checks. A test keeps these
# equal to FFCV's own definitions.
BETON_VERSION = 2
HEADER = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)


def beton_header(path: Path) -> tuple[list[str], int]:
    """(field names, number of samples) of a .beton file; ValueError when it is not one."""
    size = path.stat().st_size
    if size < HEADER.itemsize:
        raise ValueError("shorter than a header")
    header = np.fromfile(path, dtype=HEADER, count=1)[0]
    if header["version"] != BETON_VERSION:
        raise ValueError(f"format version {header['version']}, expected {BETON_VERSION}")
    n_fields = int(header["num_fields"])
    if not 0 < n_fields <= 64 or HEADER.itemsize + n_fields * FIELD_DESC.itemsize > size:
        raise ValueError(f"{n_fields} fields do not fit the file")
    if not 0 < int(header["alloc_table_ptr"]) <= size:
        raise ValueError("its allocation table lies outside the file")
    descs = np.fromfile(path, dtype=FIELD_DESC, count=n_fields, offset=HEADER.itemsize)
    names = [bytes(d["name"]).split(b"\0", 1)[0].decode("ascii", "replace") for d in descs]
    return names, int(header["num_samples"])


# -- writing -------------------------------------------------------------------------------------


def prepare(
    dataset: str,
    out: str | Path,
    root: str | None = None,
    download: bool = False,
    val_size: int = 5000,
    split_seed: int = 0,
    workers: int = 0,
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    force: bool = False,
    log=print,
) -> tuple[dict, bool]:
    """Write `out`/{train,val,test}.beton and metadata.json; returns (metadata, whether anything was
    written). Same inputs (source checksum, split, write options) as the folder's metadata = no-op."""
    out = Path(out)
    DATASETS.get(dataset)  # unknown names fail here, listing the choices
    cfg = DataConfig(
        dataset=dataset, root=root, download=download, loader="torch", val_size=val_size, split_seed=split_seed
    )
    source = {"arrays": _Arrays, "images": _ImageFolder}[DATASETS.traits(dataset).get("stored_as", "arrays")](cfg)
    wanted = {
        "format": FORMAT,
        "dataset": dataset,
        "source": {"root": str(source.root), "sha256": source.checksum, "checksum_of": source.checksum_of},
        "split": {"val_size": val_size, "split_seed": split_seed},
        "write": source.write_options(max_resolution, jpeg_quality),
    }
    meta_path = out / "metadata.json"
    if not force and _up_to_date(out, meta_path, wanted):
        log(f"{out}: up to date ({dataset}, source sha256 {source.checksum[:12]}); nothing to write")
        return json.loads(meta_path.read_text()), False

    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # from here on the folder does not look prepared until the end
    for stale in out.glob(".*.tmp*"):  # a killed prepare's temporaries (distswitch.io names)
        stale.unlink()
    import_ffcv()
    import ffcv

    files, counts = _write_splits(source, out, (max_resolution, jpeg_quality), workers, log)
    meta = {
        **wanted,
        "info": asdict(source.info),
        "counts": counts,
        "files": files,
        "image_shape": [source.info.channels, source.info.image_size, source.info.image_size],
        "storage": source.storage,
        "ffcv": getattr(ffcv, "__version__", "1.0.2"),
    }
    meta["info"]["mean"], meta["info"]["std"] = list(source.info.mean), list(source.info.std)
    meta["info"]["classes"] = list(source.info.classes)
    write_json(meta_path, meta, indent=1)
    log(
        f"{meta_path}: {counts['train']} train / {counts['val']} val / {counts['test']} test, {source.info.num_classes} classes"
    )
    return meta, True


def _write_splits(source, out: Path, options: tuple, workers: int, log) -> tuple[dict, dict]:
    """Each split as `out`/<split>.beton, whole or not at all: ({split: file}, {split: examples})."""
    from ffcv.writer import DatasetWriter

    files, counts = {}, {}
    for split in SPLITS:
        items = source.split(split)
        name = f"{split}.beton"
        log(f"writing {out / name}: {len(items)} images")
        with atomic_path(out / name) as partial:
            writer = DatasetWriter(
                str(partial),
                source.fields(*options),
                page_size=source.page_size,
                num_workers=workers or len(os.sched_getaffinity(0)),
            )
            writer.from_indexed_dataset(items, chunksize=256)
        files[split] = {"name": name, "bytes": (out / name).stat().st_size}
        counts[split] = len(items)
    return files, counts


def _up_to_date(out: Path, meta_path: Path, wanted: dict) -> bool:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if any(meta.get(key) != value for key, value in wanted.items()):
        return False
    return all(
        (out / f["name"]).is_file() and (out / f["name"]).stat().st_size == f["bytes"] for f in meta["files"].values()
    )


class _Items:
    """An indexable (image, label) sequence, as FFCV's writer reads it (in its worker processes)."""

    def __init__(self, get, n: int) -> None:
        self.get, self.n = get, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.get(i)


class _Arrays:
    """A dataset the registry reads into uint8 arrays: stored raw, HxWxC (FFCV's image layout)."""

    storage = "ndarray-uint8-hwc"
    page_size = 1 << 21  # FFCV's smallest: each writer process leaves at most one part-filled page
    checksum_of = "uint8 images and int64 labels of the source's train and test sets"

    def __init__(self, cfg: DataConfig) -> None:
        train_full, test, self.info = DATASETS.get(cfg.dataset)(cfg)
        self.root = cfg.root or "(dataset default)"
        digest = hashlib.sha256()
        for part in (train_full.images, train_full.labels, test.images, test.labels):
            digest.update(str(tuple(part.shape)).encode())
            digest.update(part.contiguous().numpy().tobytes())
        self.checksum = digest.hexdigest()
        train_idx, val_idx = split_indices(len(train_full), cfg.val_size, cfg.split_seed)
        self.parts = {"train": train_full.subset(train_idx), "val": train_full.subset(val_idx), "test": test}

    def write_options(self, max_resolution, jpeg_quality) -> dict:
        """What else the files depend on (recorded in metadata.json: a change rewrites them)."""
        return {}

    def fields(self, max_resolution, jpeg_quality):
        from ffcv.fields import IntField, NDArrayField

        c, s = self.info.channels, self.info.image_size
        return {"image": NDArrayField(np.dtype("uint8"), (s, s, c)), "label": IntField()}

    def split(self, name: str) -> _Items:
        part = self.parts[name]
        images = part.images.permute(0, 2, 3, 1).contiguous().numpy()
        labels = part.labels.numpy()
        return _Items(lambda i: (images[i], int(labels[i])), len(labels))


class _ImageFolder:
    """A class-per-folder tree: ROOT/train/<class>/* and ROOT/test/<class>/* (or val/ for ImageNet's
    layout, used as the test split). Validation is carved from train/."""

    storage = "ffcv-rgb (raw or jpeg)"
    page_size = 1 << 23  # FFCV's default; a page must hold the largest stored image
    checksum_of = "sorted relative paths and byte sizes of every image file (contents are not read)"

    def __init__(self, cfg: DataConfig) -> None:
        if not cfg.root:
            raise DataError("--root: imagefolder needs the tree's root (with train/ and test/ or val/ inside)")
        self.root = Path(cfg.root)
        test_dir = next((self.root / d for d in ("test", "val") if (self.root / d).is_dir()), None)
        if not (self.root / "train").is_dir() or test_dir is None:
            raise DataError(f"--root: {str(self.root)!r} needs train/ and test/ (or val/) folders of class folders")
        classes = sorted(d.name for d in (self.root / "train").iterdir() if d.is_dir())
        if not classes:
            raise DataError(f"--root: {self.root / 'train'} has no class folders")
        train = self._files(self.root / "train", classes)
        test = self._files(test_dir, classes)
        digest = hashlib.sha256()
        for path, label in train + test:
            digest.update(f"{path.relative_to(self.root)}\t{path.stat().st_size}\t{label}\n".encode())
        self.checksum = digest.hexdigest()
        train_idx, val_idx = split_indices(len(train), cfg.val_size, cfg.split_seed)
        self.parts = {"train": [train[i] for i in train_idx], "val": [train[i] for i in val_idx], "test": test}
        mean, std = self._mean_std(self.parts["train"])
        # 224 = the usual ImageNet crop; data.image_size chooses another.
        self.info = DatasetInfo("imagefolder", len(classes), 3, 224, mean, std, "resized_crop", tuple(classes))

    @staticmethod
    def _files(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
        found = [d.name for d in folder.iterdir() if d.is_dir()]
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"--root: {folder} has class folders not in train/: {', '.join(extra[:5])}")
        files = []
        for label, name in enumerate(classes):
            if (folder / name).is_dir():
                files += [(p, label) for p in sorted((folder / name).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"--root: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
        return files

    @staticmethod
    def _mean_std(files: list[tuple[Path, int]]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        from PIL import Image

        pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:MEAN_STD_SAMPLE]
        total, total_sq, pixels = np.zeros(3), np.zeros(3), 0
        for i in pick.tolist():
            with Image.open(files[i][0]) as im:
                x = np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
            total += x.sum(0)
            total_sq += (x**2).sum(0)
            pixels += len(x)
        mean = total / pixels
        std = np.sqrt(np.maximum(total_sq / pixels - mean**2, 1e-12))
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def write_options(self, max_resolution, jpeg_quality) -> dict:
        return {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality}

    def fields(self, max_resolution, jpeg_quality):
        from ffcv.fields import IntField, RGBImageField

        return {
            "image": RGBImageField(write_mode="smart", max_resolution=max_resolution, jpeg_quality=jpeg_quality),
            "label": IntField(),
        }

    def split(self, name: str) -> _Items:
        files = self.parts[name]

        def get(i: int):
            from PIL import Image

            path, label = files[i]
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB")), label

        return _Items(get, len(files))
