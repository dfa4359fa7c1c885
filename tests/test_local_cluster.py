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


@pytest.fixture(scope="module")
def local_cluster():
    from distswitch.driver.cluster import connect as _connect

    ray, owned = _connect(make_config())
    assert owned, "a Ray session was left open by an earlier test"
    try:
        from ray._private.worker import get_dashboard_url

        listening = set()
        for proc in psutil.Process().children(recursive=True):  # GCS, raylet, dashboard, agents, workers
            try:
                listening |= {(c.laddr.ip, c.laddr.port, proc.name()) for c in proc.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN}
            except psutil.NoSuchProcess:
                pass
        yield get_dashboard_url(), listening
    finally:
        ray.shutdown()


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
