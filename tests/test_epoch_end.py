"""The epoch's end, alone: what rank 0 saves, reports and keeps after each epoch, and in which order."""

from __future__ import annotations

import torch

from conftest import FASHION_INFO, make_config
from distswitch.build import build, make_replicas
from distswitch.engine import Engine, EpochStats
from distswitch.manifest import MANIFEST_FILE
from distswitch.worker import Session
from distswitch.worker.callbacks import EpochEnd, RunState

CPU = torch.device("cpu")


def _stats(epoch: int, val_acc: float) -> EpochStats:
    return EpochStats(
        epoch=epoch,
        gated=True,
        steps={"tnn": 1},
        train_loss={"tnn": 1.0},
        train_acc={"tnn": 0.5},
        val_loss=1.0,
        val_acc=val_acc,
        kept_fraction=0.5,
        kept={},
        lr={"tnn": 0.1},
        seconds=1.0,
        images_per_s=10.0,
        comm_bytes_per_step={},
    )


class _Session(Session):
    """The local session, noting what each report carried."""

    def __init__(self, out) -> None:
        super().__init__(out)
        self.reports: list[tuple[str, bool]] = []

    def report(self, metrics: dict, checkpoint, name: str) -> None:
        self.reports.append((name, checkpoint is not None))
        super().report(metrics, checkpoint, name)


def test_rank_0_checkpoints_every_second_epoch_keeps_the_best_and_only_the_latest_local_folder(tmp_path):
    cfg = make_config(
        model={"name": "mlp"},
        method="switch",
        train={"epochs": 4},
        distributed={"checkpoint_every": 2},
        out_dir=str(tmp_path / "run"),
    )
    tnn, gates, method = build(cfg, FASHION_INFO, 10, CPU)
    engine = Engine(cfg, tnn, gates, method, CPU, make_replicas(tnn, method, CPU))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    session, seen = _Session(tmp_path / "run"), []
    state = RunState()

    def observe(stats: EpochStats, checkpointed: bool) -> None:  # observers see the epoch before the report
        seen.append((stats.epoch, checkpointed, len(session.reports)))

    end = EpochEnd(cfg, FASHION_INFO, engine, engine.replicas, session, state, 10, scratch, [observe])
    for epoch, acc in enumerate([0.5, 0.7, 0.6, 0.65]):
        end.on_epoch_end(_stats(epoch, acc))
    assert state.best == {"val_acc": 0.7, "epoch": 1} and [h.epoch for h in state.history] == [0, 1, 2, 3]
    assert seen == [(0, False, 0), (1, True, 1), (2, False, 2), (3, True, 3)]
    assert session.reports == [("epoch_0000", False), ("epoch_0001", True), ("epoch_0002", False), ("epoch_0003", True)]
    # Only the latest local folder is kept (it serves a stop); the session holds every reported one.
    assert [p.name for p in scratch.iterdir() if p.is_dir()] == ["epoch_0003"] and state.latest.name == "epoch_0003"
    for name in ("epoch_0001", "epoch_0003"):
        folder = tmp_path / "run" / "checkpoints" / name
        assert {"state.pt", "best.pt", MANIFEST_FILE} <= {p.name for p in folder.iterdir()}
    # best.pt is epoch 1's (the best), in the epoch-3 checkpoint too.
    best = torch.load(tmp_path / "run" / "checkpoints" / "epoch_0003" / "best.pt", weights_only=False)
    assert best["epoch"] == 1
