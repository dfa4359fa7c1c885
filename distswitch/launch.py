"""Launch: a Ray Train (V2) TorchTrainer runs `distswitch.run.train` on every worker.

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

import dataclasses
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from distswitch.config import Config, ConfigError
from distswitch.data.datasets import DataError
from distswitch.registry import UnknownNameError

USER_ERRORS = (ConfigError, UnknownNameError, DataError)

# Local clusters only (set before ray.init, inherited by every Ray process it starts). On a small
# machine Ray Train's start-up is CPU-bound: these switch off background actors and polls that
# compete with the workers' start (measurements: benchmarks/ray_startup/REPORT.md). They are
# `setdefault`s: a user's own setting wins.
LOCAL_CLUSTER_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # no spot preemption on a workstation
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",  # Prometheus metrics: nothing scrapes a local cluster
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # controller poll (default 2 s, added to start and end)
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Everywhere: under `uv run`, Ray would re-launch every worker through `uv run` and upload the
# working directory; our workers already run in this interpreter's environment.
DRIVER_ENV = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
# Oldest Linux driver per CUDA major version of a torch build (NVIDIA's CUDA toolkit release notes).
CUDA_DRIVERS = {"12": "525", "13": "580"}


def storage_path(cfg: Config) -> str:
    """`distributed.storage_path`, or <out_dir>/ray (absolute: Ray rejects relative paths)."""
    path = cfg.distributed.storage_path or str(Path(cfg.out_dir) / "ray")
    return path if "://" in path else str(Path(path).expanduser().resolve())


def local_paths(cfg: Config) -> Config:
    """Data paths made absolute: a local cluster's workers need not share the launcher's directory.
    (On a remote cluster relative paths are left to the workers: `ray job submit --working-dir`.)"""
    from distswitch.data.beton import default_dir

    data = cfg.data
    beton_dir = str(Path(data.beton_dir or default_dir(data.dataset)).expanduser().resolve())
    root = str(Path(data.root).expanduser().resolve()) if data.root else None
    return dataclasses.replace(cfg, data=dataclasses.replace(data, beton_dir=beton_dir, root=root))


def run_name(cfg: Config) -> str:
    return cfg.distributed.name or Path(cfg.out_dir).resolve().name


def launch(cfg: Config, summary_json: str | Path | None = None, launched_at: float | None = None) -> dict:
    """Train `cfg` on Ray Train; returns the summary (also written to out_dir/summary.json).

    `launched_at`: the wall-clock origin of the start-up figures (the CLI passes the moment its
    `main` began; default: this call)."""
    launched_at = launched_at if launched_at is not None else time.time()
    from distswitch.run import preflight, validate_names  # torch: after the config checks

    validate_names(cfg)
    if os.environ.get("RAY_ADDRESS"):
        _check_ray_address(os.environ["RAY_ADDRESS"])
    else:  # the data and the cluster are this machine's: fail before Ray starts
        cfg = local_paths(cfg)
        preflight(cfg)
        _check_cuda(cfg)
        _check_fits(cfg, _local_resources(cfg), remote=False)
    out = Path(cfg.out_dir)
    if (out / "summary.json").is_file():
        raise ConfigError(f"out_dir: {str(out)!r} already holds a finished run (summary.json); "
                          f"pass another out_dir=... or remove it")
    _writable(out, "out_dir")
    storage = storage_path(cfg)
    _check_previous_launch(cfg, out, storage)
    from distswitch.io import write_text

    write_text(out / "config.yaml", cfg.to_yaml())

    tracking = None
    if cfg.tracking.enabled:  # before Ray starts: an unreachable server fails in seconds
        from distswitch.tracking import open_run

        tracking = open_run(cfg, run_key=f"{storage}/{run_name(cfg)}")
    marks = {"driver_ready": time.time()}
    try:
        ray, started = _connect(cfg)
        marks["ray_connected"] = time.time()
        try:
            summary = _run(ray, cfg, out, storage, marks, launched_at, tracking)
        finally:
            if started:  # our connection, and our local cluster: closed with us (a joined cluster runs on);
                ray.shutdown()  # also ends Ray's log stream, so the last line printed is ours
    except BaseException as exc:
        if tracking is not None:
            from distswitch.tracking import fail_run

            fail_run(*tracking, exc)
        raise
    from distswitch.io import write_json

    if tracking is not None:
        from distswitch.tracking import finish_run

        summary["mlflow"] = {"tracking_uri": tracking[0], "run_id": tracking[1], "experiment": cfg.tracking.experiment}
        write_json(out / "summary.json", summary)
        try:
            finish_run(*tracking, out, summary)
        except BaseException as exc:  # the results are on disk; the run must not stay RUNNING
            from distswitch.tracking import fail_run

            fail_run(*tracking, exc)
            raise
    if summary_json is not None:
        write_json(Path(summary_json), summary)
    return summary


def _run(ray, cfg: Config, out: Path, storage: str, marks: dict, launched_at: float,
         tracking: tuple[str, str] | None) -> dict:
    _check_resources(ray, cfg)
    _check_storage(ray, storage)
    _check_tracking(ray, tracking)
    trainer = make_trainer(cfg, storage, marks, launched_at, tracking)
    marks["fit_called"] = time.time()  # the dict is pickled with the trainer: set before fit
    return collect(_fit(trainer, cfg, storage), cfg, out, storage)


def make_trainer(cfg: Config, storage: str, marks: dict, launched_at: float, tracking: tuple[str, str] | None,
                 callbacks: list | None = None):
    """The TorchTrainer that runs `distswitch.run.train` on every worker (train and tune share it)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.distributed
    backend = d.backend if d.backend != "auto" else ("nccl" if d.use_gpu else "gloo")
    return TorchTrainer(
        _worker_main,
        train_loop_config={"config": cfg.to_dict(), "launched_at": launched_at, "marks": marks, "tracking": tracking},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker=dict(d.resources_per_worker) or None),
        run_config=RunConfig(
            name=run_name(cfg),
            storage_path=storage,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=d.checkpoints_to_keep),
            # Train's print patch copies every print into its log stream: the driver saw lines twice.
            worker_runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            callbacks=callbacks,
        ),
    )


def collect(result, cfg: Config, out: Path, storage: str) -> dict:
    """The final checkpoint's files into out_dir; returns the summary."""
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a final checkpoint; see {storage}/{run_name(cfg)}")
    from distswitch.io import write_json
    from distswitch.run import STOPPED_FILE, collect_final

    with result.checkpoint.as_directory() as folder:
        if (Path(folder) / STOPPED_FILE).is_file():
            from distswitch.engine import TrainingStopped

            message = json.loads((Path(folder) / STOPPED_FILE).read_text())["message"]
            raise TrainingStopped(f"{message} (kept in {result.checkpoint.path}; the same command resumes from it)")
        collect_final(Path(folder), out)
    summary = json.loads((out / "summary.json").read_text())
    summary["checkpoint_path"] = str(result.checkpoint.path)  # known here only: where Ray stored it
    if not summary.get("git_sha"):  # a worker without the repository (or git) next to its code
        from distswitch.tracking import git_sha

        summary["git_sha"] = git_sha()
    write_json(out / "summary.json", summary)
    return summary


def _worker_main(loop_config: dict) -> None:
    """Runs on every Ray Train worker (the process group is already up)."""
    import ray.train
    import ray.train.torch

    from distswitch.engine import TrainingStopped
    from distswitch.run import train

    cfg = Config.from_dict(loop_config["config"])
    context = ray.train.get_context()
    session = RaySession(context.get_world_rank(), context.get_world_size())
    tracker = None
    if loop_config.get("tracking") and session.rank == 0:  # only rank 0 talks to MLflow
        from distswitch.tracking import EpochLogger

        tracker = EpochLogger(*loop_config["tracking"])
    try:
        train(cfg, session, ray.train.torch.get_device(), launched_at=loop_config.get("launched_at"),
              marks=loop_config.get("marks"), tracker=tracker)
    except TrainingStopped:
        # Raising would make Ray Train retry from the last checkpoint, into the same stop. `train`
        # reported the stop as the latest checkpoint; the driver raises it (`collect`).
        return


class RaySession:
    """`distswitch.run.Session` on a Ray Train worker: checkpoints go through `ray.train.report`."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self._restored: Path | None = None

    def latest_checkpoint(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        # A local copy (downloaded when the storage is remote), removed when the run ends.
        self._restored = Path(tempfile.mkdtemp(prefix="distswitch-restore-"))
        return Path(checkpoint.to_directory(str(self._restored)))

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


# -- the cluster -------------------------------------------------------------------------------------

def _connect(cfg: Config):
    """Join the cluster in RAY_ADDRESS, or start a local one bound to 127.0.0.1.

    Returns (ray, whether this call connected: then the caller shuts the connection down, which
    also stops a local cluster it started)."""
    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    # Private: Ray reads this switch once, when ray is first imported, and offers no public setter
    # (the uv hook became the default in ray-project/ray#53060; ray_constants is its only home).
    from ray._private import ray_constants

    # Ray reads the uv hook's switch once, at its first import: a process that imported ray before
    # this call (a notebook, a test session) would still ship workers an uploaded copy without .git.
    if os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"].lower() in ("0", "false"):
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False

    if ray.is_initialized():
        return ray, False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level="WARNING")
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"RAY_ADDRESS={address!r}: cannot connect ({str(exc).splitlines()[0]}); "
                              "check the address (and RAY_AUTH_MODE=token if the cluster uses token "
                              "authentication, as `ray start` does by default), or unset RAY_ADDRESS "
                              "to start a local cluster") from None
        return ray, True
    for key, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(
        address="local",  # a new cluster even when another one runs on this machine
        num_cpus=cfg.distributed.local_cpus or os.cpu_count(),
        # The dashboard serves the state API that Train's placement-group cleaner polls (without it
        # the cleaner warns every second); loopback only.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        # Idle workers prestarted for tasks we never run only compete with Train's actors for CPU.
        _system_config={"enable_worker_prestart": False},
        logging_level="WARNING",
    )
    return ray, True


def _check_resources(ray, cfg: Config) -> None:
    _check_fits(cfg, ray.cluster_resources(), remote=bool(os.environ.get("RAY_ADDRESS")))


def _check_cuda(cfg: Config) -> None:
    """GPUs asked for a local cluster: CUDA must be usable here, or Ray would wait for GPUs it
    counts as 0. The locked wheels are CUDA 13 builds: they need an NVIDIA driver >= 580."""
    import torch

    if not cfg.distributed.use_gpu or torch.cuda.is_available():
        return
    built = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, which needs an NVIDIA driver "
             f">= {CUDA_DRIVERS.get(torch.version.cuda.split('.')[0], '?')} (`nvidia-smi` shows yours)"
             if torch.version.cuda else f"torch {torch.__version__} is a CPU-only build")
    raise ConfigError(f"distributed.use_gpu: true, but CUDA is not usable on this machine ({built}); "
                      "set distributed.use_gpu: false, or run where a GPU and its driver are")


def _local_resources(cfg: Config) -> dict:
    """What the local cluster `_connect` starts will have (known before starting it)."""
    import torch

    return {"CPU": float(cfg.distributed.local_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def _check_fits(cfg: Config, total: dict, remote: bool) -> None:
    """Workers that can never be placed would wait forever: say so instead."""
    d = cfg.distributed
    per_worker = dict(d.resources_per_worker) or {"CPU": 1.0}
    if d.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    for name, amount in per_worker.items():
        need, have = amount * d.num_workers, total.get(name, 0.0)
        if need > have:
            where = "this cluster" if remote else "the local cluster"
            hint = ("lower distributed.num_workers or resources_per_worker" if name != "GPU"
                    else "set distributed.use_gpu: false or run on a cluster with GPUs")
            msg = f"distributed: {d.num_workers} workers need {need:g} {name}, {where} has {have:g}; {hint}"
            if remote:  # an autoscaler may add nodes: warn only
                print(f"distswitch: warning: {msg} (waiting for the autoscaler)", file=sys.stderr)
            else:
                raise ConfigError(msg)


def _check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A host:port that nothing answers at fails in seconds, before an MLflow run is opened
    (`ray.init` would retry for much longer)."""
    if "://" in address and not address.startswith("ray://"):
        return  # not a GCS address; ray.init says what it makes of it
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"RAY_ADDRESS={address!r}: nothing answers at {host}:{port} ({exc.strerror or exc}); "
                          "start the cluster (`ray start --head`), fix the address, or unset RAY_ADDRESS "
                          "to start a local cluster") from None


def _check_previous_launch(cfg: Config, out: Path, storage: str) -> None:
    """A relaunch resumes the checkpoints in storage: refuse, before Ray starts, settings that
    could not resume them (the workers check the checkpoint itself again)."""
    run_dir = Path(storage) / run_name(cfg)
    previous = out / "config.yaml"
    if "://" in storage or not previous.is_file() or not any(run_dir.glob("epoch_*")):
        return
    from distswitch.config import load_config

    try:
        old = load_config(previous)
    except ConfigError:
        return  # written by another version: the workers' check on the checkpoint decides
    for key in ("model", "method", "switcher", "data"):
        if getattr(old, key) != getattr(cfg, key):
            raise ConfigError(f"{key}: differs from the checkpoint in {run_dir} that this run would resume; "
                              f"use another out_dir (or distributed.name) for a new run, or the earlier {key} settings")


def _check_storage(ray, storage: str) -> None:
    """A local storage path must be writable here and, on several nodes, visible from all of them."""
    if "://" in storage:
        import pyarrow.fs

        try:
            pyarrow.fs.FileSystem.from_uri(storage)
        except Exception as exc:  # unknown scheme, missing credentials library, ...
            raise ConfigError(f"distributed.storage_path: {storage!r} is not usable ({exc}); "
                              "use a shared path or s3://bucket/prefix") from None
        return
    _writable(Path(storage), "distributed.storage_path")
    blind = _blind_nodes(ray, Path(storage))
    if blind:
        raise ConfigError(f"distributed.storage_path: {storage!r} is local to this node; nodes {', '.join(blind)} "
                          "cannot see it. Use a filesystem mounted on every node or s3://bucket/prefix")


def _check_tracking(ray, tracking: tuple[str, str] | None) -> None:
    """An MLflow SQLite store must be one file for the driver and rank 0, wherever rank 0 lands:
    on several nodes its folder must be visible from all of them (a shared filesystem)."""
    if tracking is None or not tracking[0].startswith("sqlite:///"):
        return
    folder = Path(tracking[0][len("sqlite:///"):]).parent
    blind = _blind_nodes(ray, folder)
    if blind:
        raise ConfigError(f"tracking: MLflow logs to {tracking[0]}, a folder nodes {', '.join(blind)} cannot see "
                          "(rank 0 may run there); set tracking.uri or MLFLOW_TRACKING_URI to a server every node "
                          "reaches, or put out_dir on a filesystem mounted on every node")


def _blind_nodes(ray, folder: Path) -> list[str]:
    """Addresses of the cluster's live nodes that cannot see a file written into `folder` here
    (none on one node)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return []
    marker = folder / f".distswitch-probe-{uuid.uuid4().hex}"
    marker.write_text("probe")
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=0)
        def sees(path: str) -> bool:
            return os.path.exists(path)

        checks = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                  .remote(str(marker)) for n in nodes]
        return [n["NodeManagerAddress"] for n, ok in zip(nodes, ray.get(checks, timeout=120)) if not ok]
    finally:
        marker.unlink(missing_ok=True)


class RunFailed(RuntimeError):
    """Ray Train gave up on the workers (failures beyond distributed.max_failures); the message says
    which worker failed and which checkpoint a rerun would resume."""


def _fit(trainer, cfg: Config, storage: str):
    """trainer.fit(), with a worker's user error (bad data root, ...) as that one error, and a run
    Ray gave up on as one RunFailed line instead of Ray's traceback."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    try:
        return trainer.fit()
    except WorkerGroupError as exc:
        for failure in exc.worker_failures.values():
            cause = getattr(failure, "cause", failure)
            if isinstance(cause, USER_ERRORS):  # the worker's own message, not a Ray traceback
                raise cause from None
        rank, failure = min(exc.worker_failures.items(), key=lambda item: item[0])
        cause = getattr(failure, "cause", failure)
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        raise RunFailed(f"worker {rank} failed ({type(cause).__name__}{': ' + first if first else ''}); "
                        f"distributed.max_failures={cfg.distributed.max_failures} allows no more restarts; "
                        f"{_resume_hint(cfg, storage)}") from exc


def _resume_hint(cfg: Config, storage: str) -> str:
    run_dir = f"{storage}/{run_name(cfg)}"
    if "://" not in storage:
        done = sorted(p for p in Path(run_dir).glob("epoch_*") if (p / "state.pt").is_file())
        if not done:
            return f"no epoch had been checkpointed in {run_dir}; the same command starts again"
        return f"the last checkpoint, {done[-1]}, is intact: the same command resumes from it"
    return f"the same command resumes from the last checkpoint in {run_dir}"


def _writable(path: Path, key: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write to {str(path)!r} ({exc.strerror}); choose a writable directory") from None
