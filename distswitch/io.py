"""Files that are whole or absent: the one way the package writes a file or a folder.

Every write goes to a temporary name beside its target and is then renamed over it (`os.replace`,
atomic on POSIX filesystems), so a reader, a crash or a killed worker never leaves or sees half a
file: a checkpoint or summary.json that exists is complete. Temporary names keep the target's suffix
(matplotlib and torch pick formats from it) and carry the process id (two writers never share one).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s content to; renamed over `path` when the block succeeds,
    removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent) + ("\n" if indent is not None else ""))


def save_torch(obj, path: str | Path) -> None:
    """torch.save, atomically."""
    import torch  # here: the driver writes configs and summaries without importing torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def copy_file(source: str | Path, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)


def copy_tree(source: str | Path, path: str | Path) -> None:
    """Replace folder `path` by a copy of `source`: copied beside it first, so a crash leaves either
    the old folder or the new one whole."""
    path = Path(path)
    with atomic_path(path) as tmp:
        shutil.copytree(source, tmp)
        shutil.rmtree(path, ignore_errors=True)  # os.replace cannot replace a non-empty folder
