"""`distswitch train` on the driver: a Ray Train (V2) TorchTrainer runs the worker's entry function
on every worker.

One code path for every size: one worker or many, a local cluster or the one `RAY_ADDRESS` names
(`ray job submit` sets it for the entrypoint). The driver validates what it can before Ray starts,
joins or starts the cluster, checks that the workers fit and that the storage works, runs the
trainer, and copies the final artifacts (summary.json, model.pt, checkpoints/best.pt) from the
final Ray checkpoint into out_dir, so they arrive even when rank 0 ran on another node.

Restarts: Ray Train restores its checkpoint list from `<storage_path>/<name>`, so a worker-group
restart (`distributed.max_failures`) and a second launch of the same command both continue from
the latest epoch checkpoint.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

from distswitch import checkpoint
from distswitch.checkpoint import RESUME_KEYS
from distswitch.config import Config, ConfigError
from distswitch.driver.claim import claim
from distswitch.driver.launch import on_cluster, prepare
from distswitch.driver.run import RunHandle
from distswitch.io import write_json, write_text
from distswitch.stop import INCURABLE, RunFailed

# The worker's entry: called on every Ray Train worker with the loop config (plain data).
Worker = Callable[[dict], None]
# Ray Train's worker-group start timeout (distributed.start_timeout), read from the environment only.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def storage_path(cfg: Config) -> str:
    """`distributed.storage_path`, or <out_dir>/ray (absolute: Ray rejects relative paths)."""
    path = cfg.distributed.storage_path or str(Path(cfg.out_dir) / "ray")
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run_name(cfg: Config) -> str:
    return cfg.distributed.name or Path(cfg.out_dir).resolve().name


def launch(
    cfg: Config, worker: Worker, summary_json: str | Path | None = None, launched_at: float | None = None
) -> dict:
    """Train `cfg` on Ray Train, `worker` on every worker; returns the summary (also written to
    out_dir/summary.json).

    `launched_at`: the wall-clock origin of the start-up figures (the CLI passes the moment its
    `main` began; default: this call)."""
    launched_at = launched_at if launched_at is not None else time.time()
    cfg, out = prepare(cfg, "summary.json", "run")
    with claim(out):  # one driver per run, before Ray starts; held until the run has ended
        return _launch(cfg, worker, out, summary_json, launched_at)


def _launch(cfg: Config, worker: Worker, out: Path, summary_json: str | Path | None, launched_at: float) -> dict:
    storage = storage_path(cfg)
    check_previous_launch(cfg, out, storage)
    write_text(out / "config.yaml", cfg.to_yaml())
    run = RunHandle.open(cfg, storage, run_name(cfg))  # before Ray starts: an unreachable server fails in seconds
    marks = {"driver_ready": time.time()}
    try:
        with on_cluster(cfg, storage, run.uri, marks):
            trainer = make_trainer(cfg, worker, storage, marks, launched_at, run.tracking)
            marks["fit_called"] = time.time()  # the dict is pickled with the trainer: set before fit
            summary = run.collect(fit(trainer, cfg, storage))
    except BaseException as exc:
        run.fail(exc)
        raise
    result = run.finish(summary)
    if summary_json is not None:
        write_json(Path(summary_json), result)
    return result


def make_trainer(
    cfg: Config,
    worker: Worker,
    storage: str,
    marks: dict,
    launched_at: float,
    tracking: tuple[str, str] | None,
    callbacks: list | None = None,
):
    """The TorchTrainer that runs `worker` on every worker (train and tune share it)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.distributed
    backend = d.backend if d.backend != "auto" else ("nccl" if d.use_gpu else "gloo")
    return TorchTrainer(
        worker,
        train_loop_config={"config": cfg.to_dict(), "launched_at": launched_at, "marks": marks, "tracking": tracking},
        torch_config=TorchConfig(backend=backend),
        # [min, max]: Ray Train's elastic worker group (a tuple), which resizes between them.
        scaling_config=ScalingConfig(
            num_workers=d.num_workers if isinstance(d.num_workers, int) else tuple(d.num_workers),
            elastic_resize_monitor_interval_s=d.resize_interval,
            use_gpu=d.use_gpu,
            resources_per_worker=dict(d.resources_per_worker) or None,
        ),
        run_config=RunConfig(
            name=run_name(cfg),
            storage_path=storage,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=d.checkpoints_to_keep),
            # Train's INFO lines (each report's every metric, each checkpoint, the controller's
            # resources) from both ranks drown the epoch lines: shown with train.verbose only.
            logging_config=LoggingConfig(log_level="INFO" if cfg.train.verbose else "WARNING"),
            # Train's print patch copies every print into its log stream: the driver saw lines twice.
            worker_runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            callbacks=callbacks,
        ),
    )


def fit(trainer, cfg: Config, storage: str):
    """trainer.fit(), with a worker's user error (bad data root, ...) as that one error, and a run
    Ray gave up on as one RunFailed line instead of Ray's traceback."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    if cfg.distributed.start_timeout is not None:
        # Ray Train reads it from the environment only; fit() hands the launching process's
        # setting on to its controller (ray.train.v2 constants, ENV_VARS_TO_PROPAGATE).
        os.environ[START_TIMEOUT_ENV] = str(cfg.distributed.start_timeout)
    try:
        return _in_thread(trainer.fit)
    except WorkerGroupError as exc:
        for failure in exc.worker_failures.values():
            cause = getattr(failure, "cause", failure)
            if isinstance(cause, INCURABLE):  # the worker's own message, not a Ray traceback
                raise cause from None
        rank, failure = min(exc.worker_failures.items(), key=lambda item: item[0])
        cause = getattr(failure, "cause", failure)
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        raise RunFailed(
            f"worker {rank} failed ({type(cause).__name__}{': ' + first if first else ''}); "
            f"distributed.max_failures={cfg.distributed.max_failures} allows no more restarts; "
            f"{resume_hint(cfg, storage)}"
        ) from exc


def _in_thread(call: Callable):
    """call() in a daemon thread, waited on in this one. Called in the main thread, TorchTrainer.fit
    puts its own SIGINT handler in place of the CLI's (one that exits 1 after a ~9 s abort, the
    workers training on); in another thread it leaves signals to us, as it does under Tune. A
    daemon: a stop signal's KeyboardInterrupt leaves it blocked in Ray, and it must not hold the exit."""

    outcome: dict = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="distswitch-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # a short wait: the signal handler runs between waits at the latest
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def resume_hint(cfg: Config, storage: str) -> str:
    run_dir = f"{storage}/{run_name(cfg)}"
    if "://" not in storage:
        try:
            found = checkpoint.choose(checkpoint.stored_in(Path(run_dir)), say=lambda line: None)
        except checkpoint.CheckpointDamaged as exc:
            return str(exc)
        if found is None:
            return f"no epoch had been checkpointed in {run_dir}; the same command starts again"
        return f"the last checkpoint, {found[0].where}, is intact: the same command resumes from it"
    return f"the same command resumes from the last checkpoint in {run_dir}"


def check_previous_launch(cfg: Config, out: Path, storage: str) -> None:
    """A relaunch resumes the checkpoints in storage: refuse, before Ray starts, settings that
    could not resume them, and storage whose every checkpoint is damaged (the workers check the
    checkpoint they resume again: storage may be remote, or change meanwhile)."""
    run_dir = Path(storage) / run_name(cfg)
    stored = checkpoint.stored_in(run_dir) if "://" not in storage else []
    previous = out / "config.yaml"
    if stored and previous.is_file():
        from distswitch.config import load_config

        try:
            old = load_config(previous)
        except ConfigError:
            old = None  # written by another version: the workers' check on the checkpoint decides
        for key in RESUME_KEYS:
            if old is not None and getattr(old, key) != getattr(cfg, key):
                raise ConfigError(
                    f"{key}: differs from the checkpoint in {run_dir} that this run would resume; "
                    f"use another out_dir (or distributed.name) for a new run, or the earlier {key} settings"
                )
    # Every checkpoint damaged: one line now, not one attempt per allowed failure on the same files.
    checkpoint.choose(stored, say=lambda line: None)
