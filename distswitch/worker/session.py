"""What a training run needs from whatever launched it: its rank, checkpoints in and out, reports,
a progress bar. `Session` is a single local process; `RaySession` is one Ray Train worker, and the
only place the worker touches Ray.

A session saves checkpoint folders and, on restart, lists those in the run's storage (the worker
resumes the newest intact one); `report` is called by every worker the same number of times (a
collective under Ray), with a folder from rank 0 only.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distswitch.checkpoint import Stored, collect_final, stored_in
from distswitch.config import Config
from distswitch.io import copy_tree
from distswitch.manifest import order


class Session:
    """One local process: checkpoints under out_dir/checkpoints, the final files into out_dir."""

    rank = 0
    world_size = 1

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir) / "checkpoints"

    def stored(self) -> list[Stored]:
        """The checkpoint folders under out_dir/checkpoints (read in place)."""
        return stored_in(self.root)

    def report(self, metrics: dict, checkpoint: Path | None, name: str) -> None:
        if checkpoint is not None and name == "final":
            collect_final(checkpoint, self.root.parent)
        elif checkpoint is not None:
            copy_tree(checkpoint, self.root / name)

    def progress(self, total: int, desc: str):
        from tqdm import tqdm  # here: the engine, export and checkpoints need no progress bars (gpu_check)

        return tqdm(total=total, desc=desc, unit="step", leave=True, dynamic_ncols=True, file=sys.stderr)

    def close(self) -> None:
        """The run is over on this worker (finished, stopped or failed): drop local copies."""


class RaySession(Session):
    """A Ray Train worker: checkpoints go through `ray.train.report` to the run's storage."""

    def __init__(self, rank: int, world_size: int, verbose: bool = False) -> None:
        self.rank, self.world_size = rank, world_size
        self._restored: Path | None = None
        if not verbose:
            # Ray Train logs every report (each metric, from every rank) at INFO on a logger named by
            # its file's path, which its LoggingConfig does not reach; the epoch line says it already.
            from ray.train.v2._internal.execution import context

            logging.getLogger(context.__file__).setLevel(logging.WARNING)

    def stored(self) -> list[Stored]:
        """Ray Train's latest checkpoint and the other checkpoint folders beside it in the run's
        storage (local or remote, through the checkpoint's filesystem); each fetched on demand."""
        import posixpath

        import ray.train
        from pyarrow import fs as pafs

        latest = ray.train.get_checkpoint()
        if latest is None:
            return []
        parent = posixpath.dirname(latest.path.rstrip("/"))
        infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
        others = [
            ray.train.Checkpoint(info.path, filesystem=latest.filesystem)
            for info in infos
            if info.type == pafs.FileType.Directory
            and order(info.base_name)
            and info.path.rstrip("/") != latest.path.rstrip("/")
        ]
        return [
            Stored(posixpath.basename(c.path), c.path, lambda c=c: self._fetch(c), latest=c is latest)
            for c in [latest, *others]
        ]

    def _fetch(self, checkpoint) -> Path:
        """A local copy (downloaded when the storage is remote), removed when the run ends."""
        if self._restored is None:
            self._restored = Path(tempfile.mkdtemp(prefix="distswitch-restore-"))
        folder = self._restored / Path(checkpoint.path).name
        if not folder.is_dir():
            checkpoint.to_directory(str(folder))
        return folder

    def report(self, metrics: dict, checkpoint: Path | None, name: str) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name if ckpt is not None else None)

    def close(self) -> None:
        if self._restored is not None:
            shutil.rmtree(self._restored, ignore_errors=True)

    def progress(self, total: int, desc: str):
        from ray.experimental.tqdm_ray import tqdm

        return tqdm(total=total, desc=desc)


@dataclass
class Run:
    """One worker's run, as it travels through `train`: the config, the session, the device, this
    worker's scratch folder, the start-up timeline (`launched_at`, the launcher's and this worker's
    wall-clock `marks`) and rank 0's MLflow tracker."""

    cfg: Config
    session: Session
    device: torch.device
    scratch: Path
    launched_at: float | None = None
    marks: dict[str, float] = field(default_factory=dict)
    tracker: object | None = None
