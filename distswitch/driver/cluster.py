"""The cluster, as the driver meets it: join the one RAY_ADDRESS names or start a local one, and
the checks that turn a run that could never start (workers that do not fit, no CUDA, storage or an
MLflow store some node cannot see, an address nothing answers at) into one line before it starts.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import uuid
from pathlib import Path

from distswitch import signals
from distswitch.config import Config, ConfigError
from distswitch.signals import STOP_SIGNALS

# Local clusters only (set before ray.init, inherited by every Ray process it starts). On a small
# machine Ray Train's start-up is CPU-bound: these switch off background actors and polls that
# compete with the workers' start (measurements: docs/results.md, "Ray Train's own start-up"). They are
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


def connect(cfg: Config):
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
    # ray.init replaces SIGTERM's handler with one that exits at once (and a local cluster's with
    # one that kills its processes): a launcher's own (the CLI's ends the run cleanly) is put back.
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    # Stop signals are held while the cluster starts. A signal for the launcher's whole process group
    # or cgroup (`kill -- -PGID`, systemd, SLURM) must reach the driver only, which halts the workers
    # and stops the cluster: when the raylet took the same SIGTERM and died first, the driver's Ray
    # core exited at once with status 1 ("the local Raylet is dead") before the run was ended (seen
    # once in CI). The blocked mask is inherited by every process the cluster starts (Ray blocks
    # SIGINT in them for the same reason); fate-sharing's SIGKILL still ends them with the driver.
    # The driver's own handler acts on a signal once the cluster is there whole, then stopped.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with signals.held():
            try:
                _init(ray, cfg)
            finally:
                if threading.current_thread() is threading.main_thread():
                    for signum, handler in handlers.items():
                        if callable(handler):
                            signal.signal(signum, handler)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    except KeyboardInterrupt:
        if ray.is_initialized():
            disconnect(ray, True)
        raise
    return ray, True


# Ray Train's actors, by the process title Ray gives an actor's process ("ray::<class>[.<method>]").
TRAIN_ACTORS = ("ray::TrainController", "ray::RayTrainWorker")


def halt_local_training(timeout: float = 5.0) -> None:
    """Kill the Train actors of the local cluster this driver started, the controller first (so its
    failure policy restarts no worker). A stop signal then ends training within
    a second: ray.shutdown() stops the cluster's other processes first, and the workers trained on
    for ~7 s (3 more epochs of the SIGTERM test's run), and Train's own abort took ~9 s. Killing
    is safe for the run: a checkpoint cut short has no manifest, and the next launch skips it."""
    import psutil

    def title(process) -> str:
        try:
            return " ".join(process.cmdline())
        except psutil.Error:  # gone meanwhile
            return ""

    titled = [(title(p), p) for p in psutil.Process().children(recursive=True)]  # each read once
    found = [p for actor in TRAIN_ACTORS for t, p in titled if t.startswith(actor)]  # the controller first
    for process in found:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(found, timeout=timeout)


def disconnect(ray, started: bool) -> None:
    """Close this driver's connection; a local cluster it started is stopped at once.

    The cluster's processes ignore SIGTERM (see `connect`): ray.shutdown()'s SIGTERM, a second's wait
    per process, then SIGKILL added ~2.7 s to every run, and the agents the raylet started outlived a
    raylet killed without them. So the driver disconnects first (Ray has no public switch for that:
    its private node handle is taken out of ray.shutdown()'s hands), then every process the cluster
    started, and theirs, read before any of them is gone (orphans leave the tree), gets SIGKILL. Only
    those: the driver's other children (a test session's servers, a notebook's) are not the cluster's."""
    if not started:
        return
    import psutil
    from ray._private import worker as ray_worker

    node, ray_worker._global_node = getattr(ray_worker, "_global_node", None), None
    processes = []
    for infos in node.all_processes.values() if node is not None else []:
        for info in infos:
            try:
                process = psutil.Process(info.process.pid)
                processes += [process, *process.children(recursive=True)]
            except psutil.Error:  # gone meanwhile
                pass
    ray.shutdown()  # the driver disconnects; the processes are left to us
    if node is not None and node.is_head():
        node.destroy_external_storage()  # objects spilled to disk
    for process in processes:
        try:
            process.kill()
        except psutil.Error:  # gone meanwhile
            pass
    psutil.wait_procs(processes, timeout=10)


def _init(ray, cfg: Config) -> None:
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level="WARNING")
        except (ConnectionError, ValueError, RuntimeError) as exc:
            # A cluster with token authentication refuses a client without a token, and Ray's own
            # error then names no cause (its GCS client's retry warnings say it): give the commands.
            auth = (
                ""
                if os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
                else "; if the cluster uses token authentication (`ray start` with RAY_AUTH_MODE=token, "
                "`make head`): `export RAY_AUTH_MODE=token` and the head's token in ~/.ray/auth_token "
                "or `export RAY_AUTH_TOKEN=...` (what `ray get-auth-token` prints on the head), "
                "cluster/README.md section 0"
            )
            raise ConfigError(
                f"RAY_ADDRESS={address!r}: cannot connect ({str(exc).splitlines()[0]}); "
                f"check the address, or unset RAY_ADDRESS to start a local cluster{auth}"
            ) from None
        return
    for key, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(key, value)
    # Ray's state API (Train's placement-group cleaner polls it from inside the cluster) finds its
    # cluster by auto-detection, which fails ("Found multiple active Ray instances") while another
    # local cluster runs on the machine, e.g. a search beside a quick train. So this cluster's
    # dashboard gets a port chosen here, and every process the cluster starts inherits its address
    # (only those: the driver's own environment is put back after the start).
    port = _free_port()
    before = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        ray.init(
            address="local",  # a new cluster even when another one runs on this machine
            num_cpus=cfg.distributed.local_cpus or os.cpu_count(),
            # The dashboard serves the state API that Train's placement-group cleaner polls (without
            # it the cleaner warns every second); loopback only.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            _node_ip_address="127.0.0.1",
            # Idle workers prestarted for tasks we never run only compete with Train's actors for CPU.
            _system_config={"enable_worker_prestart": False},
            logging_level="WARNING",
        )
    finally:
        if before is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = before


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # read before RAY_ADDRESS by Ray's state API client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_resources(ray, cfg: Config) -> None:
    check_fits(cfg, ray.cluster_resources(), remote=bool(os.environ.get("RAY_ADDRESS")))


def check_cuda(cfg: Config) -> None:
    """GPUs asked for a local cluster: CUDA must be usable here, or Ray would wait for GPUs it
    counts as 0. The locked wheels are CUDA 13 builds: they need an NVIDIA driver >= 580."""
    import torch

    if not cfg.distributed.use_gpu or torch.cuda.is_available():
        return
    built = (
        f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, which needs an NVIDIA driver "
        f">= {CUDA_DRIVERS.get(torch.version.cuda.split('.')[0], '?')} (`nvidia-smi` shows yours)"
        if torch.version.cuda
        else f"torch {torch.__version__} is a CPU-only build"
    )
    raise ConfigError(
        f"distributed.use_gpu: true, but CUDA is not usable on this machine ({built}); "
        "set distributed.use_gpu: false, or run where a GPU and its driver are"
    )


def local_resources(cfg: Config) -> dict:
    """What the local cluster `connect` starts will have (known before starting it)."""
    import torch

    return {"CPU": float(cfg.distributed.local_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_fits(cfg: Config, total: dict, remote: bool) -> None:
    """Workers that can never be placed would wait forever: say so instead."""
    d = cfg.distributed
    per_worker = dict(d.resources_per_worker) or {"CPU": 1.0}
    if d.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    for name, amount in per_worker.items():
        need, have = amount * d.min_workers, total.get(name, 0.0)  # elastic: the run starts with min
        if need > have:
            where = "this cluster" if remote else "the local cluster"
            hint = (
                "lower distributed.num_workers or resources_per_worker"
                if name != "GPU"
                else "set distributed.use_gpu: false or run on a cluster with GPUs"
            )
            msg = f"distributed: {d.min_workers} workers need {need:g} {name}, {where} has {have:g}; {hint}"
            if remote:  # an autoscaler may add nodes: warn only
                print(f"distswitch: warning: {msg} (waiting for the autoscaler)", file=sys.stderr)
            else:
                raise ConfigError(msg)


def check_ray_address(address: str, timeout: float = 5.0) -> None:
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
        raise ConfigError(
            f"RAY_ADDRESS={address!r}: nothing answers at {host}:{port} ({exc.strerror or exc}); "
            "start the cluster (`ray start --head`), fix the address, or unset RAY_ADDRESS "
            "to start a local cluster"
        ) from None


def check_storage(ray, storage: str) -> None:
    """A local storage path must be writable here and, on several nodes, visible from all of them."""
    if "://" in storage:
        import pyarrow.fs

        try:
            pyarrow.fs.FileSystem.from_uri(storage)
        except Exception as exc:  # unknown scheme, missing credentials library, ...
            raise ConfigError(
                f"distributed.storage_path: {storage!r} is not usable ({exc}); use a shared path or s3://bucket/prefix"
            ) from None
        return
    writable(Path(storage), "distributed.storage_path")
    blind = blind_nodes(ray, Path(storage))
    if blind:
        raise ConfigError(
            f"distributed.storage_path: {storage!r} is local to this node; nodes {', '.join(blind)} "
            "cannot see it. Use a filesystem mounted on every node or s3://bucket/prefix"
        )


def check_tracking(ray, uri: str | None) -> None:
    """An MLflow SQLite store must be one file for the driver and rank 0, wherever rank 0 lands:
    on several nodes its folder must be visible from all of them (a shared filesystem)."""
    if uri is None or not uri.startswith("sqlite:///"):
        return
    folder = Path(uri[len("sqlite:///") :]).parent
    blind = blind_nodes(ray, folder)
    if blind:
        raise ConfigError(
            f"tracking: MLflow logs to {uri}, a folder nodes {', '.join(blind)} cannot see "
            "(rank 0 may run there); set tracking.uri or MLFLOW_TRACKING_URI to a server every node "
            "reaches, or to a sqlite:/// store on a filesystem mounted on every node"
        )


def blind_nodes(ray, folder: Path) -> list[str]:
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

        checks = [
            sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(marker)
            )
            for n in nodes
        ]
        return [n["NodeManagerAddress"] for n, ok in zip(nodes, ray.get(checks, timeout=120)) if not ok]
    finally:
        marker.unlink(missing_ok=True)


def writable(path: Path, key: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{key}: cannot write to {str(path)!r} ({exc.strerror}); choose a writable directory"
        ) from None
