"""A checkpoint folder's seal: the size and SHA-256 of each of its files, in `manifest.json`,
written last. A folder whose files match its manifest is intact; anything else (a file cut short by
a full disk, a node lost mid-upload, a file missing or changed) is damaged and says how.

Light on purpose (no torch): the CLI names `CheckpointDamaged` before anything heavy is imported,
and the driver checks a local run's checkpoints before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from distswitch.io import write_json

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "distswitch.manifest/1"
# Checkpoint folder names: epoch_0003, epoch_0003-2 (that epoch saved again after a damaged
# epoch_0003 was skipped: Ray Train deletes an evicted checkpoint by its path, so a name is never
# reused), stopped_0003_<token> (a stop for good after epoch 3: a copy of its state).
_NAME = re.compile(r"^(?:epoch_(?P<epoch>\d+)(?:-(?P<again>\d+))?|stopped_(?P<stopped>\d+)_[0-9a-f]+)$")


class CheckpointDamaged(ValueError):
    """Every checkpoint a run could resume is damaged: no restart can cure it."""


def seal(folder: str | Path, epoch: int | None) -> None:
    """Write `folder`'s manifest (its files' sizes and SHA-256; the epoch whose state it holds)."""
    folder = Path(folder)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE
    }
    write_json(folder / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "epoch": epoch, "files": files})


def damage(folder: str | Path) -> str | None:
    """What is wrong with `folder` against its manifest, in a few words; None if it is intact."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE} (cut short before its seal)"
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST_FILE} is unreadable"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} holds {size} bytes, {want['bytes']} were written"
        if _sha256(path) != want["sha256"]:
            return f"{name}'s SHA-256 differs from the one written"
    return None


def order(name: str) -> tuple[int, int] | None:
    """A checkpoint folder's place among its run's, newest last ((epoch, repeat)); None if `name`
    is not a checkpoint folder's."""
    match = _NAME.match(name)
    if match is None:
        return None
    if match["stopped"] is not None:
        return int(match["stopped"]), -1  # a copy of that epoch's state: tried after the epoch's own
    return int(match["epoch"]), int(match["again"] or 1)


def unused_name(epoch: int, taken: set[str]) -> str:
    """epoch_NNNN, or epoch_NNNN-k when that name is already in the run's storage."""
    name, again = f"epoch_{epoch:04d}", 1
    while name in taken:
        again += 1
        name = f"epoch_{epoch:04d}-{again}"
    return name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
