"""The documented cluster path: a real Ray head on loopback, `ray job submit` from the command line
with cluster/runtime_env.yaml, the job's summary on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent  # the venv's `ray` and `distswitch`


def _ray(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` bound to 127.0.0.1, token authentication on (Ray's default for `ray start`)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # jobs use the default store (conftest sets one for the tests)
    gcs, dash = free_port(), free_port()
    started = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats", env=env)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        _ray("stop", "--force", env=env, timeout=120)


def test_ray_job_submit_runs_distswitch_train_to_success(head, tmp_path, fashion_betons):
    env, address = head
    out = tmp_path / "job"
    job_id = f"distswitch-test-{uuid.uuid4().hex[:8]}"
    submit = _ray(
        "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", ".",
        "--runtime-env", "cluster/runtime_env.yaml", "--",
        "distswitch", "train", "configs/fashion_lenet5.yaml", f"out_dir={out}", "train.epochs=2",
        "schedule.warmup_epochs=0", "schedule.finetune_epochs=0", "budget.fraction=null", "data.train_limit=2000", "train.progress=false",
        # /data is not uploaded: the .beton files are on "shared storage", as cluster/README.md says.
        f"data.beton_dir={fashion_betons}",
        env=env, timeout=600,
    )
    status = _ray("job", "status", "--address", address, job_id, env=env)
    # `ray job status` ends with "Job '<id>' succeeded" (coloured) for status SUCCEEDED.
    assert f"Job '{job_id}' succeeded" in status.stdout.replace("\x1b[32m", "").replace("\x1b[39m", ""), \
        status.stdout[-2000:] + submit.stdout[-3000:] + submit.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] > 0.5 and len(summary["history"]) == 2
    assert (out / "model.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()
    # The job joined the head (RAY_ADDRESS set by the job server) instead of starting a cluster.
    assert "test acc" in submit.stdout
    # Its MLflow run, in the default store of a job: beside out_dir (the job's own directory is Ray's
    # temporary copy of --working-dir); finished, with the epochs and the test accuracy.
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["test/acc"] == summary["test_acc"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0, 1]


def test_dashboard_and_job_server_listen_on_loopback_only(head):
    _, address = head
    port = int(address.rsplit(":", 1)[1])
    hosts = {c.laddr.ip for c in psutil.net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert hosts == {"127.0.0.1"}, hosts
