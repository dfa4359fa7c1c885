"""What happens after every epoch, read top-down in `EpochEnd.on_epoch_end` (the engine calls it):
the epoch joins the history, the best epoch so far is selected, the replicas are checked and rank 0
saves the checkpoint (at checkpoint epochs), the observers see the epoch (rank 0: its line, its
MLflow metrics), the session gets the report, and rank 0 drops the previous local checkpoint.

Observers only watch: a callable `observer(stats, checkpointed)` changes nothing the run depends on.
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
from distswitch.worker.session import Run


@dataclass
class RunState:
    """What the epochs build up (restored on resume)."""

    history: list[EpochStats] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "epoch": None})
    latest: Path | None = None  # rank 0: the latest checkpoint folder (kept for a stop)
    taken: set[str] = field(default_factory=set)  # checkpoint names already in the run's storage


class EpochEnd:
    def __init__(
        self,
        cfg: Config,
        info: DatasetInfo,
        engine: Engine,
        replicas: Replicas,
        session,
        state: RunState,
        steps_per_epoch: int,
        scratch: Path,
        observers: list,
    ) -> None:
        self.cfg, self.info, self.engine, self.replicas, self.session = cfg, info, engine, replicas, session
        self.state, self.steps, self.scratch, self.observers = state, steps_per_epoch, scratch, observers
        self.lead = session.rank == 0

    def on_epoch_end(self, stats: EpochStats) -> None:
        s, last = self.state, self.cfg.train.epochs - 1
        s.history.append(stats)
        # The best validation epoch so far: val_acc is all-reduced, so every rank decides alike.
        is_best = stats.selectable and stats.val_acc > s.best["val_acc"]
        if is_best:
            s.best.update(val_acc=stats.val_acc, epoch=stats.epoch)
        checkpointed = (stats.epoch + 1) % self.cfg.distributed.checkpoint_every == 0 or stats.epoch == last
        rng = self.check_replicas(stats) if checkpointed else None
        folder = self.save(stats, is_best, rng) if self.lead and (is_best or checkpointed) else None
        # Before the report: a run stopped in between resumes from the epoch before and logs this one
        # once (the tracker skips logged steps); the other order lost its metrics for good.
        for observe in self.observers:
            observe(stats, checkpointed)
        self.report(stats, folder)
        if folder is not None:  # the previous local copy goes; the latest serves a stop
            if s.latest is not None:
                shutil.rmtree(s.latest, ignore_errors=True)
            s.latest = folder

    def check_replicas(self, stats: EpochStats) -> list[dict]:
        """Every worker's generators; identical replicas, or a stop (a checkpoint of diverged workers
        is worthless)."""
        rng = self.replicas.gather(checkpoint.rng_state())
        stats.replica_digests = self.replicas.gather(state_digest(self.engine.tnn, self.engine.method.source))
        if len(set(stats.replica_digests)) > 1:
            raise RuntimeError(
                f"worker replicas diverged by the end of epoch {stats.epoch + 1} "
                f"(parameter digests {stats.replica_digests}); please report this"
            )
        return rng

    def save(self, stats: EpochStats, is_best: bool, rng: list[dict] | None) -> Path | None:
        """Rank 0: best.pt when the epoch is the best, the epoch's sealed folder at checkpoint epochs."""
        s = self.state
        saved = checkpoint.bundle(self.cfg, self.info, self.engine, stats.epoch, self.steps, s.history, s.best, rng)
        if is_best:
            save_torch(saved, self.scratch / "best.pt")
        if rng is None:
            return None
        folder = self.scratch / unused_name(stats.epoch, s.taken)
        s.taken.add(folder.name)
        folder.mkdir()
        save_torch(saved, folder / "state.pt")
        if (self.scratch / "best.pt").is_file():
            shutil.copyfile(self.scratch / "best.pt", folder / "best.pt")
        seal(folder, stats.epoch)  # last: a folder whose files match it is complete
        return folder

    def report(self, stats: EpochStats, folder: Path | None) -> None:
        metrics = epoch_metrics(stats)
        metrics["tune/score"] = (
            stats.val_acc - self.cfg.tune.kept_weight * stats.kept_fraction
        )  # `distswitch tune`'s trade-off
        self.session.report(metrics, folder, folder.name if folder is not None else f"epoch_{stats.epoch:04d}")


def print_epoch(cfg: Config):
    return lambda stats, checkpointed: print(epoch_line(cfg, stats), file=sys.stderr, flush=True)


def log_epoch(cfg: Config, info: DatasetInfo, engine: Engine, tracker):
    """Rank 0 with tracking: the epoch's metrics to MLflow (the compact size at checkpoint epochs: it
    is a CPU pass over the whole TNN, and a GPU epoch can be shorter than the pass)."""
    dense = count(dense_tnn(cfg, info), torch.zeros(1, info.channels, info.image_size, info.image_size))

    def observe(stats: EpochStats, checkpointed: bool) -> None:
        size = compact_size(cfg, info, engine, stats.epoch) if checkpointed else None
        tracker.log(tracking_metrics(stats, size, dense), stats.epoch)

    return observe


def epoch_end(
    run: Run, info: DatasetInfo, engine: Engine, replicas: Replicas, state: RunState, steps_per_epoch: int
) -> EpochEnd:
    """The epoch's end for this rank, its observers chosen once."""
    lead = run.session.rank == 0
    observers = [print_epoch(run.cfg)] if lead else []
    if lead and run.tracker is not None:
        observers.append(log_epoch(run.cfg, info, engine, run.tracker))
    return EpochEnd(run.cfg, info, engine, replicas, run.session, state, steps_per_epoch, run.scratch, observers)


def epoch_metrics(s: EpochStats) -> dict:
    """Flat per-epoch metrics (what Ray Train records; MLflow-style names)."""
    m = {
        "epoch": s.epoch,
        "val/acc": s.val_acc,
        "val/loss": s.val_loss,
        "kept_fraction": s.kept_fraction,
        "seconds": s.seconds,
        "images_per_s": s.images_per_s,
    }
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
        metrics.update(
            {
                "compact/macs": size["macs"],
                "compact/params": size["params"],
                "macs_kept": size["macs"] / dense["macs"],
                "params_kept": size["params"] / dense["params"],
            }
        )
    del every["epoch"]
    metrics.update(every)
    for layer, row in stats.kept.get("layers", {}).items():
        metrics[f"kept/{layer}"] = row["kept"] / max(row["units"], 1)
    return metrics


def epoch_line(cfg: Config, s: EpochStats) -> str:
    losses = " ".join(f"{ph}/loss={v:.4f}" for ph, v in s.train_loss.items())
    layers = (s.kept or {}).get("layers") or {}
    widths = f" [{widths_line(layers)}]" if layers else ""
    return (
        f"epoch {s.epoch + 1}/{cfg.train.epochs} {losses} val/acc={s.val_acc:.4f} "
        f"kept={s.kept_fraction:.3f}{widths} ({s.seconds:.1f}s, {s.images_per_s:.0f} img/s)"
    )
