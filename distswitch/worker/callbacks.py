"""The epoch's jobs around the engine, one small class each. The engine calls
`on_epoch_end(stats)` on each, in order, after every epoch; they share the run's `RunState`:

    Record          the epoch joins the history; this epoch's decisions start blank
    SelectBest      the best validation epoch so far (every rank decides alike: val_acc is all-reduced)
    CheckReplicas   at checkpoint epochs: every worker's generators, and identical replicas or a stop
    PrintEpoch      rank 0: one line per epoch
    SaveCheckpoint  rank 0: best.pt when this epoch is the best, the epoch's folder at checkpoint epochs
    Report          every rank: metrics (and rank 0's folder) to the session (Ray, under Ray)
    LogMetrics      rank 0 with tracking: the epoch's metrics to MLflow
    KeepLatest      rank 0: local copies of older epoch folders dropped (the latest serves a stop)

Rank-0 jobs are chosen once, in `epoch_callbacks`, not tested inside each epoch.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distswitch import checkpoint
from distswitch.artifacts import compact_size
from distswitch.build import dense_tnn
from distswitch.config import Config
from distswitch.counting import count
from distswitch.data import DatasetInfo
from distswitch.engine import Engine, EpochStats
from distswitch.io import save_torch
from distswitch.manifest import seal, unused_name
from distswitch.parallel import Replicas, state_digest
from distswitch.summary import widths_line


@dataclass
class RunState:
    """What the epochs build up (restored on resume), and the current epoch's decisions."""

    history: list[EpochStats] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "epoch": None})
    is_best: bool = False
    checkpoint: bool = False  # this epoch is checkpointed
    rng: list[dict] | None = None  # every worker's generators, at checkpoint epochs
    folder: Path | None = None  # rank 0: this epoch's checkpoint folder
    latest: Path | None = None  # rank 0: the latest checkpoint folder (kept for a stop)
    taken: set[str] = field(default_factory=set)  # checkpoint names already in the run's storage


class Record:
    def __init__(self, state: RunState) -> None:
        self.state = state

    def on_epoch_end(self, stats: EpochStats) -> None:
        s = self.state
        s.history.append(stats)
        s.is_best, s.checkpoint, s.rng, s.folder = False, False, None, None


class SelectBest:
    def __init__(self, state: RunState) -> None:
        self.state = state

    def on_epoch_end(self, stats: EpochStats) -> None:
        s = self.state
        s.is_best = stats.selectable and stats.val_acc > s.best["val_acc"]
        if s.is_best:  # val_acc is summed over workers: every rank takes the same decision
            s.best.update(val_acc=stats.val_acc, epoch=stats.epoch)


class CheckReplicas:
    def __init__(self, cfg: Config, state: RunState, engine: Engine, replicas: Replicas) -> None:
        self.cfg, self.state, self.engine, self.replicas = cfg, state, engine, replicas

    def on_epoch_end(self, stats: EpochStats) -> None:
        s, every = self.state, self.cfg.distributed.checkpoint_every
        s.checkpoint = (stats.epoch + 1) % every == 0 or stats.epoch == self.cfg.train.epochs - 1
        if not s.checkpoint:
            return
        s.rng = self.replicas.gather(checkpoint.rng_state())
        # Replicas must be identical; a checkpoint of diverged workers is worthless.
        stats.replica_digests = self.replicas.gather(state_digest(self.engine.tnn, self.engine.method.source))
        if len(set(stats.replica_digests)) > 1:
            raise RuntimeError(f"worker replicas diverged by the end of epoch {stats.epoch + 1} "
                               f"(parameter digests {stats.replica_digests}); please report this")


class PrintEpoch:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def on_epoch_end(self, stats: EpochStats) -> None:
        print(epoch_line(self.cfg, stats), file=sys.stderr, flush=True)


class SaveCheckpoint:
    def __init__(self, cfg: Config, info: DatasetInfo, engine: Engine, steps_per_epoch: int, state: RunState,
                 scratch: Path) -> None:
        self.cfg, self.info, self.engine, self.steps = cfg, info, engine, steps_per_epoch
        self.state, self.scratch = state, scratch

    def on_epoch_end(self, stats: EpochStats) -> None:
        s = self.state
        if not (s.is_best or s.checkpoint):
            return
        saved = checkpoint.bundle(self.cfg, self.info, self.engine, stats.epoch, self.steps, s.history, s.best, s.rng)
        if s.is_best:
            save_torch(saved, self.scratch / "best.pt")
        if s.checkpoint:
            s.folder = self.scratch / unused_name(stats.epoch, s.taken)
            s.taken.add(s.folder.name)
            s.folder.mkdir()
            save_torch(saved, s.folder / "state.pt")
            if (self.scratch / "best.pt").is_file():
                shutil.copyfile(self.scratch / "best.pt", s.folder / "best.pt")
            seal(s.folder, stats.epoch)  # last: a folder whose files match it is complete


class Report:
    def __init__(self, cfg: Config, session, state: RunState) -> None:
        self.cfg, self.session, self.state = cfg, session, state

    def on_epoch_end(self, stats: EpochStats) -> None:
        metrics = epoch_metrics(stats)
        metrics["tune/score"] = stats.val_acc - self.cfg.tune.kept_weight * stats.kept_fraction  # `distswitch tune`'s trade-off
        folder = self.state.folder
        self.session.report(metrics, folder, folder.name if folder is not None else f"epoch_{stats.epoch:04d}")


class LogMetrics:
    def __init__(self, cfg: Config, info: DatasetInfo, engine: Engine, state: RunState, tracker) -> None:
        self.cfg, self.info, self.engine, self.state, self.tracker = cfg, info, engine, state, tracker
        example = torch.zeros(1, info.channels, info.image_size, info.image_size)
        self.dense = count(dense_tnn(cfg, info), example)

    def on_epoch_end(self, stats: EpochStats) -> None:
        # The compact size is a CPU pass over the whole TNN: at checkpoint epochs only (a GPU epoch
        # can be shorter than the pass).
        size = compact_size(self.cfg, self.info, self.engine, stats.epoch) if self.state.checkpoint else None
        self.tracker.log(tracking_metrics(stats, size, self.dense), stats.epoch)


class KeepLatest:
    def __init__(self, state: RunState) -> None:
        self.state = state

    def on_epoch_end(self, stats: EpochStats) -> None:
        s = self.state
        if s.folder is None:
            return
        if s.latest is not None:
            shutil.rmtree(s.latest, ignore_errors=True)
        s.latest = s.folder


def epoch_callbacks(cfg: Config, info: DatasetInfo, engine: Engine, replicas: Replicas, session, state: RunState,
                    steps_per_epoch: int, scratch: Path, tracker=None) -> list:
    """The epoch's jobs for this rank, in order (rank 0's chosen here, once)."""
    lead = session.rank == 0
    return [
        Record(state),
        SelectBest(state),
        CheckReplicas(cfg, state, engine, replicas),
        *([PrintEpoch(cfg), SaveCheckpoint(cfg, info, engine, steps_per_epoch, state, scratch)] if lead else []),
        # MLflow before the checkpoint is reported: a run stopped in between then resumes from the
        # epoch before and logs nothing twice (EpochLogger skips logged steps), where the other
        # order lost the epoch's metrics for good (the checkpoint registered, the log never sent).
        *([LogMetrics(cfg, info, engine, state, tracker)] if lead and tracker is not None else []),
        Report(cfg, session, state),
        *([KeepLatest(state)] if lead else []),
    ]


def epoch_metrics(s: EpochStats) -> dict:
    """Flat per-epoch metrics (what Ray Train records; MLflow-style names)."""
    m = {"epoch": s.epoch, "val/acc": s.val_acc, "val/loss": s.val_loss, "kept_fraction": s.kept_fraction,
         "seconds": s.seconds, "images_per_s": s.images_per_s}
    for ph, v in s.train_loss.items():
        m[f"{ph}/loss"] = v
    for ph, v in s.train_acc.items():
        m[f"{ph}/acc"] = v
    for ph, v in s.lr.items():
        m[f"{ph}/lr"] = v
    for ph, v in s.comm_bytes_per_step.items():
        m[f"{ph}/comm_bytes_per_step"] = v
    return m


def tracking_metrics(stats: EpochStats, size: dict | None, dense: dict) -> dict:
    """What MLflow gets per epoch: `epoch_metrics` plus kept fractions per layer and the size
    (None: not measured this epoch)."""
    # MLflow lists a run's metrics, and its compare view picks its first plot, in the order they
    # were first logged: accuracy, kept fraction and compact MACs first. The epoch is every metric's
    # step, not a metric (as one it led the compare view's plots).
    every = epoch_metrics(stats)
    metrics = {"val/acc": every.pop("val/acc"), "kept_fraction": every.pop("kept_fraction")}
    if size is not None:
        metrics.update({"compact/macs": size["macs"], "compact/params": size["params"],
                        "macs_kept": size["macs"] / dense["macs"], "params_kept": size["params"] / dense["params"]})
    del every["epoch"]
    metrics.update(every)
    for layer, row in stats.kept.get("layers", {}).items():
        metrics[f"kept/{layer}"] = row["kept"] / max(row["units"], 1)
    return metrics


def epoch_line(cfg: Config, s: EpochStats) -> str:
    losses = " ".join(f"{ph}/loss={v:.4f}" for ph, v in s.train_loss.items())
    layers = (s.kept or {}).get("layers") or {}
    widths = f" [{widths_line(layers)}]" if layers else ""
    return (f"epoch {s.epoch + 1}/{cfg.train.epochs} {losses} val/acc={s.val_acc:.4f} "
            f"kept={s.kept_fraction:.3f}{widths} ({s.seconds:.1f}s, {s.images_per_s:.0f} img/s)")
