"""A two-node Ray cluster on one machine: each node in its own network namespace, both on a bridge
with private addresses that exist only for the test, where the team's tracking server (`make
tracking-server`, PostgreSQL store, proxied artifacts) listens too. 2-worker runs span both nodes
(one CPU each) and log to that server; the worker node is lost (all its processes killed) mid-run.
One folder is the head's alone (an empty tmpfs over it on the worker node): a local disk the other
node lacks.

Needs root and iproute2 (`make setup` installs it); the namespaces are removed afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import DEFAULT_CONFIG, REPO_ROOT, TrackingServer, free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SUBNET = "10.213.7"  # private; only the test's own namespaces have these addresses
HEAD_IP, WORKER_IP, BRIDGE_IP, GCS_PORT = f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.254", 6379


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"ip {' '.join(args)}: {proc.stderr}"
    return proc.stdout


class Cluster:
    """Two namespaces, a veth pair between them, a Ray head in one and a worker node in the other."""

    def __init__(self, tmp: Path) -> None:
        tag = uuid.uuid4().hex[:6]
        self.head, self.worker = f"dsh-{tag}", f"dsw-{tag}"
        self.devices = {self.head: f"vh{tag}", self.worker: f"vw{tag}"}
        self.tmp = tmp
        self.head_only = tmp / "head-only"  # the worker node sees an empty folder here
        self.head_only.mkdir()
        self.env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            # A lost node is declared dead after ~3 s instead of ~15 s.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        self.env.pop("RAY_ADDRESS", None)
        # The cluster's own token (as `ray get-auth-token --generate` makes one): a fresh machine has
        # no ~/.ray/auth_token, and one left there by another cluster is not this test's business.
        self.env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        _ip("netns", "add", self.head)
        _ip("netns", "add", self.worker)
        # Both nodes on one bridge in the machine's own namespace, which has an address on it too:
        # the team's tracking server listens there, as on a head's private network.
        self.bridge = f"dsb{tag}"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_IP}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for ns, addr in ((self.head, HEAD_IP), (self.worker, WORKER_IP)):
            dev = self.devices[ns]
            _ip("link", "add", dev, "type", "veth", "peer", "name", f"{dev}b")
            _ip("link", "set", f"{dev}b", "master", self.bridge)
            _ip("link", "set", f"{dev}b", "up")
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def exec(self, ns: str, *args: str, **kwargs):
        # Both namespaces share the machine's hostname, which resolves to loopback: gloo must be
        # told its interface (as on any multi-homed node; cluster/README.md).
        env = {**self.env, "GLOO_SOCKET_IFNAME": self.devices[ns]}
        return subprocess.run(
            ["ip", "netns", "exec", ns, *args], env=env, capture_output=True, text=True, cwd=REPO_ROOT, **kwargs
        )

    def start_head(self) -> None:
        started = self.exec(
            self.head,
            str(BIN / "ray"),
            "start",
            "--head",
            f"--node-ip-address={HEAD_IP}",
            f"--port={GCS_PORT}",
            "--num-cpus=1",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={self.tmp / 'h'}",
            "--disable-usage-stats",
            timeout=180,
        )
        assert started.returncode == 0, started.stderr[-3000:]

    def start_worker(self) -> None:
        # `ip netns exec` gives the command a mount namespace of its own: the tmpfs hides head_only
        # from this node's raylet and its workers only.
        ray_start = [
            str(BIN / "ray"),
            "start",
            f"--address={HEAD_IP}:{GCS_PORT}",
            f"--node-ip-address={WORKER_IP}",
            "--num-cpus=1",
            f"--temp-dir={self.tmp / 'w'}",
            "--disable-usage-stats",
        ]
        started = self.exec(
            self.worker,
            "sh",
            "-c",
            f'mount -t tmpfs none "{self.head_only}" && exec "$@"',
            "sh",
            *ray_start,
            timeout=180,
        )
        assert started.returncode == 0, started.stderr[-3000:]

    def pids(self, ns: str) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", ns).split()]

    def processes(self, ns: str, name: str) -> list[psutil.Process]:
        found = []
        for pid in self.pids(ns):
            try:
                proc = psutil.Process(pid)
                if name in " ".join(proc.cmdline()[:1]) or proc.name() == name:
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
        return found

    def kill_all(self, ns: str) -> None:
        deadline = time.time() + 30
        while (pids := self.pids(ns)) and time.time() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def destroy(self) -> None:
        for ns in (self.worker, self.head):
            self.kill_all(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60)  # takes its veth pair with it
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("network namespaces need root (the CI and development machines run as root)", pytrace=False)
    # Ray's session folders hold Unix sockets (paths <= 107 bytes): a short root, not pytest's tmp.
    root = Path(tempfile.mkdtemp(prefix="dsn-", dir="/tmp"))
    c = Cluster(root)
    try:
        c.start_head()
        c.start_worker()
        yield c
    finally:
        c.destroy()
        shutil.rmtree(root, ignore_errors=True)
        leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert c.head not in leftovers and c.worker not in leftovers


@pytest.fixture(scope="module")
def team_server(cluster, tmp_path_factory) -> str:
    """The team's tracking server on the nodes' network (not loopback: the worker node, where rank 0
    may run, reaches it over the bridge); its URI."""
    server = TrackingServer(free_port(), tmp_path_factory.mktemp("team-server"), host=BRIDGE_IP)
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


def _train(cluster: Cluster, out: Path, betons: Path, *overrides: str, tracking: str | None = None) -> subprocess.Popen:
    """`distswitch train` in the head's namespace, logging to `tracking` (default: the test's own
    store); its output goes to out's sibling <name>.log."""
    args = [
        sys.executable,
        "-m",
        "distswitch.cli",
        "train",
        str(DEFAULT_CONFIG),
        f"out_dir={out}",
        "distributed.num_workers=2",
        "schedule.warmup_epochs=0",
        "schedule.finetune_epochs=0",
        "budget.fraction=null",
        "data.train_limit=6000",
        "train.progress=false",
        f"data.beton_dir={betons}",
        *overrides,
    ]
    # The cluster's env is the module's; the store is this test's (conftest's mlflow_store).
    env = {
        **cluster.env,
        "RAY_ADDRESS": f"{HEAD_IP}:{GCS_PORT}",
        "MLFLOW_TRACKING_URI": tracking or os.environ["MLFLOW_TRACKING_URI"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f"{out.name}.log").open("w") as log:
        return subprocess.Popen(
            ["ip", "netns", "exec", cluster.head, *args], env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
        )


def _output(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()


def _registered(run_dir: Path, checkpoint: str) -> bool:
    """Ray Train has taken the checkpoint (its snapshot names it): a restart resumes from it. The
    folder alone is not enough: rank 0 writes it before the controller hears of it."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and checkpoint in snapshot.read_text()


def _kill_worker_node_during_epoch(cluster: Cluster, proc: subprocess.Popen, out: Path, epoch: int) -> None:
    """Once epoch `epoch` (1-based) runs on both nodes, SIGKILL every process of the worker node at
    once, as a lost machine loses them. (Killing its raylet alone left the Train worker running
    until it noticed, long enough in one CI run for the epoch to finish and its checkpoint to land.)"""
    run_dir = out / "ray" / out.name
    deadline = time.time() + 400
    # The run spans both nodes: one Train worker in each namespace (after a restart, once it is back).
    while not (
        _registered(run_dir, f"epoch_{epoch - 2:04d}")
        and len(cluster.processes(cluster.head, "ray::RayTrainWorker")) == 1
        and len(cluster.processes(cluster.worker, "ray::RayTrainWorker")) == 1
    ):
        assert proc.poll() is None and time.time() < deadline, (
            f"epoch {epoch} never ran on both nodes: {_output(out)[-4000:]}"
        )
        time.sleep(0.1)
    assert not (run_dir / f"epoch_{epoch - 1:04d}").exists(), f"the kill must land inside epoch {epoch}"
    cluster.kill_all(cluster.worker)


def test_a_lost_worker_node_is_survived_then_reported_in_one_line_with_the_checkpoint_intact(
    cluster, team_server, tmp_path, fashion_betons, server_experiment
):
    """max_failures=1, 4 epochs, 2 workers spanning the two nodes. The worker node's processes all killed
    in epoch 2: the node comes back (as a replaced node would) and the run resumes from epoch 1's
    checkpoint on both nodes. Killed again in epoch 3, with no restart left: one clear line naming
    the intact checkpoint, exit status 1, the MLflow run FAILED with the error."""
    out = tmp_path / "span"
    run_dir = out / "ray" / out.name
    proc = _train(
        cluster,
        out,
        fashion_betons,
        "distributed.max_failures=1",
        "train.epochs=4",
        f"tracking.experiment={server_experiment}",
        tracking=team_server,
    )
    try:
        _kill_worker_node_during_epoch(cluster, proc, out, 2)
        time.sleep(5)  # the node is declared dead (health checks every 1 s, 3 misses)
        cluster.start_worker()
        _kill_worker_node_during_epoch(cluster, proc, out, 3)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        # The module's cluster goes on to the next test: with a live worker node again (a test on a
        # cluster whose second node was left dead hung in the full run and passed alone).
        time.sleep(5)
        cluster.kill_all(cluster.worker)
        cluster.start_worker()
    output = _output(out)
    assert proc.returncode == 1, output[-4000:]
    assert "resuming from" in output and "after epoch 1/4" in output  # the first loss was survived
    last = output.strip().splitlines()[-1]
    assert last.startswith("distswitch: failed: worker ") and "distributed.max_failures=1" in last, last
    assert f"the last checkpoint, {run_dir / 'epoch_0001'}, is intact: the same command resumes from it" in last, last
    state = torch.load(run_dir / "epoch_0001" / "state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 2
    client = MlflowClient(team_server)
    [run] = client.search_runs([client.get_experiment_by_name(server_experiment).experiment_id])
    assert run.info.status == "FAILED" and "max_failures" in run.data.tags["distswitch.error"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0, 1]


def test_sqlite_tracking_on_a_folder_another_node_cannot_see_is_refused_in_one_line(cluster, tmp_path, fashion_betons):
    """Rank 0 may run on the worker node, where the driver's mlflow.db does not exist: refused before
    any worker starts, with exit status 2 and the opened MLflow run FAILED, not left RUNNING."""
    out = cluster.head_only / "tracked"
    proc = _train(
        cluster,
        out,
        fashion_betons,
        f"distributed.storage_path={tmp_path / 'ray'}",
        f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
    )
    proc.wait(timeout=300)
    output = _output(out)
    lines = output.strip().splitlines()
    assert proc.returncode == 2, output[-4000:]
    assert lines[-1].startswith(f"distswitch: error: tracking: MLflow logs to sqlite:///{out / 'mlflow.db'}"), lines[-1]
    assert f"nodes {WORKER_IP} cannot see" in lines[-1] and "tracking.uri" in lines[-1], lines[-1]
    assert not list((tmp_path / "ray").rglob("epoch_*"))
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"


def _wait_for_line(proc: subprocess.Popen, out: Path, text: str, seconds: float) -> float:
    start, deadline = time.time(), time.time() + seconds
    while text not in _output(out):
        assert proc.poll() is None, f"the run ended before {text!r}: {_output(out)[-4000:]}"
        assert time.time() < deadline, f"no {text!r} within {seconds} s: {_output(out)[-4000:]}"
        time.sleep(0.2)
    return time.time() - start


def test_an_elastic_run_goes_on_with_the_node_left_and_grows_back_when_it_returns(
    cluster, team_server, tmp_path, fashion_betons, server_experiment
):
    """num_workers [1, 2] across the two nodes: the worker node lost in epoch 2, the run goes on with
    the head's worker alone within a minute; the node back, it grows to 2 again; it finishes with
    one MLflow run holding every epoch once. start_timeout 20: Ray's first try after the loss is a
    group of 2 (its view of free resources lags), which fails after that long."""
    out = tmp_path / "elastic"
    epochs = 30
    proc = _train(
        cluster,
        out,
        fashion_betons,
        "distributed.num_workers=[1,2]",
        "distributed.max_failures=-1",
        "distributed.resize_interval=5",
        "distributed.start_timeout=20",
        f"train.epochs={epochs}",
        f"tracking.experiment={server_experiment}",
        tracking=team_server,
    )
    try:
        _kill_worker_node_during_epoch(cluster, proc, out, 2)
        shrunk = _wait_for_line(proc, out, "resuming on 1 worker a checkpoint of 2", 60)
        time.sleep(5)  # the node is declared dead (health checks every 1 s, 3 misses)
        cluster.start_worker()
        _wait_for_line(proc, out, "resuming on 2 workers a checkpoint of 1", 180)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        if not cluster.processes(cluster.worker, "raylet"):  # the next test needs both nodes
            cluster.kill_all(cluster.worker)
            cluster.start_worker()
    output = _output(out)
    assert proc.returncode == 0, output[-4000:]
    assert shrunk < 60
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and len(summary["history"]) == epochs
    client = MlflowClient(team_server)
    [run] = client.search_runs([client.get_experiment_by_name(server_experiment).experiment_id])
    assert run.info.status == "FINISHED"
    # The artifacts and the model reached the server from the driver over the nodes' network.
    assert "summary.json" in {f.path for f in client.list_artifacts(run.info.run_id)}
    assert client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc")) == list(range(epochs))
