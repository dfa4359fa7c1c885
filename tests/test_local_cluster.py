"""The local Ray cluster distswitch starts when no RAY_ADDRESS is set: its web server (dashboard,
job and state API) is reachable from this machine only.

Ray 2.60's own gRPC servers (GCS, raylet, workers, agents) listen on all interfaces whatever the
node address (Ray PR #59852 binds them to the node's address in a later version); Ray's token
authentication, on by default, guards them. The second test records that, so an upgrade that
changes it shows up here.
"""

from __future__ import annotations

import psutil
import pytest

from conftest import make_config

pytestmark = pytest.mark.slow


def test_disconnect_stops_every_process_of_the_local_cluster_it_started_and_no_other():
    # First in the file: one Ray session per process, and the module's cluster below lives until the end.
    import subprocess

    from distswitch.driver.cluster import connect, disconnect

    bystander = subprocess.Popen(["sleep", "600"])  # the driver's own child (a test session's server)
    try:
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        ray, owned = connect(make_config())
        assert owned
        cluster = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert any(p.name() == "raylet" for p in cluster)
        disconnect(ray, owned)
        assert not ray.is_initialized()
        gone, alive = psutil.wait_procs(cluster, timeout=10)
        assert not alive, [p.name() for p in alive]
        assert bystander.poll() is None
    finally:
        bystander.kill()


@pytest.fixture(scope="module")
def local_cluster():
    from distswitch.driver.cluster import connect as _connect
    from distswitch.driver.cluster import disconnect

    ray, owned = _connect(make_config())
    assert owned, "a Ray session was left open by an earlier test"
    try:
        from ray._private.worker import get_dashboard_url

        listening = set()
        for proc in psutil.Process().children(recursive=True):  # GCS, raylet, dashboard, agents, workers
            try:
                listening |= {
                    (c.laddr.ip, c.laddr.port, proc.name())
                    for c in proc.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN
                }
            except psutil.NoSuchProcess:
                pass
        yield get_dashboard_url(), listening
    finally:
        disconnect(ray, owned)


def test_the_dashboard_listens_on_loopback_only(local_cluster):
    url, listening = local_cluster
    host, port = url.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert {ip for ip, p, _ in listening if p == int(port)} == {"127.0.0.1"}


def test_ray_2_60s_internal_servers_still_listen_beyond_loopback(local_cluster):
    _, listening = local_cluster
    exposed = {name for ip, _, name in listening if ip not in ("127.0.0.1", "::1")}
    assert {"gcs_server", "raylet"} <= exposed, sorted(listening)


def test_every_process_of_the_cluster_asks_its_own_dashboard_and_the_driver_s_environment_is_unchanged(local_cluster):
    # Ray's state API would otherwise auto-detect a cluster, and fail when two run on the machine.
    import os

    import ray

    url, _ = local_cluster

    @ray.remote(num_cpus=0)
    def api_server() -> str | None:
        return os.environ.get("RAY_API_SERVER_ADDRESS")

    assert ray.get(api_server.remote()) == f"http://{url}"
    assert "RAY_API_SERVER_ADDRESS" not in os.environ


def test_a_sigterm_to_the_whole_process_group_leaves_the_cluster_running_for_the_driver_to_stop(local_cluster):
    # `kill -- -PGID`, systemd and SLURM signal every process: had the raylet died with the driver's
    # group, the driver's Ray core could exit 1 before the run was ended (seen once in CI).
    import os
    import signal
    import time

    import ray

    cluster = [p for p in psutil.Process().children(recursive=True) if p.name() in ("raylet", "gcs_server")]
    assert {p.name() for p in cluster} == {"raylet", "gcs_server"}
    for process in cluster:
        os.kill(process.pid, signal.SIGTERM)
    time.sleep(1.0)
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in cluster)

    @ray.remote(num_cpus=0)
    def answer() -> int:
        return 42

    assert ray.get(answer.remote(), timeout=60) == 42


STOP_WHILE_STARTING = """
import json, sys
import psutil
sys.path.insert(0, "tests")
from conftest import make_config
from distswitch import signals
from distswitch.driver.cluster import connect

import ray  # imported before: the signal lands inside ray.init

signals.install()  # as `distswitch train` does
print("starting", flush=True)
try:
    connect(make_config())
    outcome = "connected"
except KeyboardInterrupt as exc:
    outcome = str(exc)
left = [p.name() for p in psutil.wait_procs(psutil.Process().children(recursive=True), timeout=10)[1]]
print(json.dumps({"outcome": outcome, "initialized": ray.is_initialized(), "left": left}))
"""


def test_a_stop_signal_while_the_cluster_starts_is_acted_on_once_it_is_up_and_leaves_no_process():
    import json
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO_ROOT

    proc = subprocess.Popen(
        [sys.executable, "-c", STOP_WHILE_STARTING],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "starting"
        time.sleep(1.0)  # inside ray.init (~5 s on 2 cores)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result == {"outcome": "SIGTERM", "initialized": False, "left": []}, stderr[-3000:]
