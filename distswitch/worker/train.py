"""One training run, as one worker: build -> resume -> fit (the epoch callbacks observe it) ->
select -> test -> export.

Model selection uses the validation split only; the test split is evaluated once, on the selected
model, and reported as measured. Ray appears only through the session (`RaySession`) and
`ray_main`, the function the driver's TorchTrainer runs on every worker (the process group that
`distswitch.parallel` uses is already up there).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from distswitch import checkpoint, stop
from distswitch.artifacts import export_compact, factor_histograms
from distswitch.build import build, make_replicas, resolve_device, seed_everything, validate_names
from distswitch.config import Config
from distswitch.data import make_loaders
from distswitch.data.datasets import batch_share
from distswitch.engine import Engine, EpochStats
from distswitch.manifest import MANIFEST_FILE, seal
from distswitch.parallel import Replicas, gather_object
from distswitch.process import configure_process
from distswitch.summary import Summary
from distswitch.tracking import git_sha
from distswitch.worker.callbacks import RunState, epoch_end
from distswitch.worker.session import RaySession, Run, Session


def train(
    cfg: Config,
    session: Session | None = None,
    device: torch.device | None = None,
    launched_at: float | None = None,
    marks: dict[str, float] | None = None,
    tracker=None,
) -> dict:
    """Train (resuming from the session's latest checkpoint), select on validation, test once and
    export; returns the summary (complete on rank 0, {} elsewhere). Rank 0's final report carries
    summary.json, model.pt (the compact model) and best.pt. `launched_at` (wall clock of the
    launching process's start) gives the summary's start-up overhead, launch to first step, and
    its timeline (`marks`: the launcher's own wall-clock marks, then this worker's). `tracker`
    (rank 0 only, `delivery.EpochLogger`) gets each epoch's metrics before its checkpoint is reported."""
    marks = {**(marks or {}), "worker_started": time.time()}
    session = session or Session(cfg.out_dir)
    scratch = Path(tempfile.mkdtemp(prefix="distswitch-"))  # this worker's local files (rank 0's best.pt)
    try:
        return _train(Run(cfg, session, device or resolve_device(cfg), scratch, launched_at, marks, tracker))
    except (StoppedAt, *stop.STOPS) as exc:  # the one place a stop for good is caught on a worker
        error, kept = (exc.error, exc.kept) if isinstance(exc, StoppedAt) else (exc, None)
        report_stop(session, error, scratch, kept, gather_object)
        raise error from None
    finally:  # a stop or an error too: only a killed worker leaves its scratch behind
        shutil.rmtree(scratch, ignore_errors=True)
        session.close()


def _train(run: Run) -> dict:
    cfg, session, device, marks = run.cfg, run.session, run.device, run.marks
    validate_names(cfg)
    seed_everything(cfg.train.seed)
    configure_process(device)  # cuDNN autotuning, a heap that keeps a step's freed memory
    loaders = agreed(session, lambda: make_loaders(cfg, session.rank, session.world_size, device))
    marks["data_loaded"] = time.time()
    sync_bn = cfg.distributed.sync_batchnorm and session.world_size > 1
    tnn, gates, method = build(cfg, loaders.info, len(loaders.train), device, sync_batchnorm=sync_bn)
    marks["model_built"] = time.time()
    replicas = make_replicas(tnn, method, device)
    marks["replicas_ready"] = time.time()  # DDP wrappers built, rank 0's parameters broadcast
    engine = Engine(cfg, tnn, gates, method, device, replicas)
    share = batch_share(cfg.train.batch_size, session.rank, session.world_size)
    engine.loss_weight = (share.stop - share.start) * session.world_size / cfg.train.batch_size
    state, start_epoch, restored = resume(run, engine, replicas)
    end = epoch_end(run, loaders.info, engine, replicas, state, len(loaders.train))
    progress = None
    if cfg.train.progress and session.rank == 0:
        progress = lambda loader, epoch: session.progress(len(loader), f"epoch {epoch + 1}/{cfg.train.epochs}")  # noqa: E731
    try:
        engine.fit(loaders.train, loaders.val, start_epoch=start_epoch, callbacks=[end], progress=progress)
    except stop.TrainingStopped as exc:
        raise StoppedAt(exc, state.latest or restored) from exc
    return finish(run, engine, loaders, state, start_epoch)


def resume(run: Run, engine: Engine, replicas: Replicas) -> tuple[RunState, int, Path | None]:
    """The run so far from the newest intact checkpoint in the session's storage (a fresh one
    without): the engine's state, the history and selection, this rank's generators, rank 0's
    best.pt into `scratch`. Rank 0 chooses (naming each damaged folder it passes over) and every
    worker resumes its choice. Returns (state, first epoch to train, the folder restored or None)."""
    cfg, session, scratch = run.cfg, run.session, run.scratch
    stored = session.stored()
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if session.rank == 0 else (lambda line: None)
    chosen = None
    if session.rank == 0:
        newest = checkpoint.resume_order(stored)[:1]  # Ray Train's latest: did the last attempt stop?
        if newest and (last := stop.Stop.read(newest[0].fetch())):
            say(f"the last attempt stopped: {last.message}")
        try:
            found = checkpoint.choose(stored, say)
            chosen = found[0].name if found else None
        except checkpoint.CheckpointDamaged as exc:
            chosen = exc
    chosen = replicas.gather(chosen)[0]  # every worker resumes rank 0's choice, or fails with it
    state = RunState(taken={s.name for s in stored})  # never reused: Ray Train deletes evicted ones by path
    if isinstance(chosen, Exception):
        raise chosen
    if chosen is None:
        return state, 0, None
    [candidate] = [s for s in stored if s.name == chosen]
    latest = candidate.fetch()
    saved = checkpoint.read(latest / "state.pt")
    try:
        checkpoint.check_resumable(cfg, saved, candidate.where)
    except stop.INCURABLE as exc:
        raise StoppedAt(exc, latest) from exc
    engine.load_state_dict(saved["engine"])
    engine.retune(saved["config"]["optim"])
    state.history, state.best = [EpochStats(**h) for h in saved["history"]], dict(saved["best"])
    start_epoch = saved["epoch"] + 1
    if session.rank == 0 and (latest / "best.pt").is_file():
        shutil.copyfile(latest / "best.pt", scratch / "best.pt")
    say(f"resuming from {candidate.where} after epoch {start_epoch}/{cfg.train.epochs}")
    restore_rng(cfg, saved["rng"] or [], session, start_epoch, say)
    return state, start_epoch, latest


def restore_rng(cfg: Config, saved: list[dict], session: Session, epoch: int, say) -> None:
    """Each worker's generators as saved; on another number of workers (an elastic resize, a
    relaunch with other resources) each worker's re-seeded from train.seed, the epoch and its rank,
    said in one line. The data order needs neither: it is drawn from train.seed and the epoch."""
    w = session.world_size
    if len(saved) == w:
        checkpoint.set_rng(saved, session.rank)
        return
    seed_everything((cfg.train.seed * 1_000_003 + epoch) * 1_009 + session.rank)
    B = cfg.train.batch_size
    sizes = "+".join(str(batch_share(B, r, w).stop - batch_share(B, r, w).start) for r in range(w))
    say(
        f"resuming on {w} worker{'s' if w > 1 else ''} a checkpoint of {len(saved)}: the same global batches of "
        f"{B} in the same order, now split {sizes}; each worker's random generators re-seeded from train.seed, "
        f"the epoch and its rank"
    )


def finish(run: Run, engine: Engine, loaders, state: RunState, start_epoch: int) -> dict:
    """The selected model (rank 0 holds it, every worker gets it: the test split is sharded), tested
    once; rank 0 exports it and writes the summary; the final report on every rank."""
    cfg, session, scratch, launched_at = run.cfg, run.session, run.scratch, run.launched_at
    epoch, history = state.best["epoch"], state.history
    if session.rank == 0:
        engine.load_state_dict(checkpoint.read(scratch / "best.pt")["engine"])
    engine.replicas.broadcast_state()
    test_loss, test_acc = engine.evaluate(loaders.test, epoch)
    summary: dict = {}
    final = scratch / "final"
    if session.rank == 0:
        final.mkdir()
        export = export_compact(cfg, loaders.info, engine, epoch, loaders.example(), final / "model.pt")
        export["model_path"] = str(Path(cfg.out_dir) / "model.pt")  # where the launcher puts it
        first_step = engine.first_step_at
        record = Summary(
            model=cfg.model.name,
            method=cfg.method,
            dataset=cfg.data.dataset,
            device=str(run.device),
            workers=session.world_size,
            selected_epoch=epoch,
            resumed_at_epoch=start_epoch,
            val_acc=state.best["val_acc"],
            test_acc=test_acc,
            test_loss=test_loss,
            **export,
            **_startup(run, first_step),
            seconds_per_epoch=float(np.mean([h.seconds for h in history])),
            images_per_s=float(np.mean([h.images_per_s for h in history])),
            comm_bytes_per_step=history[-1].comm_bytes_per_step if history else {},
            train_examples=loaders.train_examples,
            data_loader=cfg.data.loader,
            git_sha=git_sha(),
            factor_histograms=factor_histograms(engine, epoch),
            torch=torch.__version__,
            out_dir=str(cfg.out_dir),
            history=[h.to_dict() for h in history],
            config=cfg.to_dict(),
        )
        record.write(final / "summary.json")
        summary = record.to_dict()
        shutil.copyfile(scratch / "best.pt", final / "best.pt")
        if first_step is not None and launched_at is not None:
            print(
                f"start-up: {record.startup_seconds:.1f} s from launch to the first step", file=sys.stderr, flush=True
            )
    # The selected epoch's validation figures ride along: a search ranks trials on every report.
    selected = next((h for h in history if h.epoch == epoch), history[-1])
    final_metrics = {
        "test/acc": test_acc,
        "test/loss": test_loss,
        "epoch": cfg.train.epochs - 1,
        "val/acc": state.best["val_acc"],
        "kept_fraction": selected.kept_fraction,
        "tune/score": state.best["val_acc"] - cfg.tune.kept_weight * selected.kept_fraction,
    }
    session.report(final_metrics, final if session.rank == 0 else None, "final")
    return summary


def _startup(run: Run, first_step: float | None) -> dict:
    """The summary's start-up fields: seconds from launch to the first step, and the timeline's marks."""
    launched_at = run.launched_at
    if launched_at is None:
        return {"startup_seconds": None, "startup_origin": None, "startup_timeline": {}}
    marks = {**run.marks, "first_step": first_step or float("nan")}
    return {
        "startup_seconds": first_step - launched_at if first_step is not None else None,
        "startup_origin": launched_at,  # wall clock (time.time) of the timeline's 0
        "startup_timeline": {k: round(v - launched_at, 2) for k, v in marks.items()},
    }


class StoppedAt(Exception):
    """A stop for good (`error`) with the checkpoint folder of the last good epoch, which the stop's
    own checkpoint keeps (`kept`)."""

    def __init__(self, error: Exception, kept: Path | None) -> None:
        super().__init__(str(error))
        self.error, self.kept = error, kept


def agreed(session: Session, make):
    """`make()`, with an incurable error on any worker raised on every worker (each worker reads its
    own data: one node may lack it), so that all of them report the stop for good together."""
    try:
        made, error = make(), None
    except stop.INCURABLE as exc:
        made, error = None, exc
    failed = [e for e in gather_object(error) if e is not None]
    if failed:
        raise failed[0]
    return made


def report_stop(session: Session, exc: Exception, scratch: Path, source: Path | None, gather) -> None:
    """A stop for good becomes the run's latest checkpoint: the last good epoch's files (`source`,
    so the same command, with e.g. a lower learning rate, resumes from them) plus stopped.json with
    the reason and, for an incurable error, its class (the driver raises it again). Every worker
    calls it (a stop is decided on all-reduced figures, an incurable error on the same files)."""
    token = gather(uuid.uuid4().hex[:8])[0]  # rank 0's: one folder name on every worker
    saved = checkpoint.read(Path(source) / "state.pt") if source is not None and session.rank == 0 else None
    name = f"stopped_{saved['epoch']:04d}_{token}" if saved is not None else f"stopped_{token}"
    folder = None
    if session.rank == 0:
        folder = scratch / name
        if saved is not None:
            shutil.copytree(source, folder, ignore=shutil.ignore_patterns(stop.FILE, MANIFEST_FILE))
        folder.mkdir(exist_ok=True)
        stop.Stop.of(exc).write(folder)
        seal(folder, saved["epoch"] if saved is not None else None)
    session.report({stop.METRIC: str(exc)}, folder, name)


def ray_main(loop_config: dict) -> None:
    """Runs on every Ray Train worker (the process group is already up); `loop_config` is the
    driver's plain data: the config as a dict, the start-up origin and marks, the MLflow run."""
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(loop_config["config"])
    context = ray.train.get_context()
    session = RaySession(context.get_world_rank(), context.get_world_size(), verbose=cfg.train.verbose)
    tracker = None
    if loop_config.get("tracking") and session.rank == 0:  # only rank 0 talks to MLflow
        from distswitch.delivery import EpochLogger

        tracker = EpochLogger(*loop_config["tracking"])
    monitor = None
    if loop_config.get("tracking") and cfg.tracking.system_metrics and context.get_local_rank() == 0:  # per node
        from ray.util import get_node_ip_address

        from distswitch.delivery import system_metrics, system_metrics_interval

        uri, run_id, out_dir = loop_config["tracking"]
        monitor = system_metrics(
            uri, run_id, out_dir, node=get_node_ip_address(), interval=system_metrics_interval(cfg)
        )
    try:
        train(
            cfg,
            session,
            ray.train.torch.get_device(),
            launched_at=loop_config.get("launched_at"),
            marks=loop_config.get("marks"),
            tracker=tracker,
        )
    except stop.STOPS:
        # The Ray boundary: raising would make Ray Train retry from the last checkpoint, into the
        # same stop. `train` reported it as the latest checkpoint; the driver raises it.
        return
    finally:
        if tracker is not None:  # what the server has not taken yet stays in the outbox for the driver
            tracker.close(cfg.tracking.send_timeout)
        if monitor is not None:
            monitor.finish()
