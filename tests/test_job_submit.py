"""The documented cluster path: a real Ray head on loopback, `ray job submit` from the command line
with cluster/runtime_env.yaml, the job's summary on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent  # the venv's `ray` and `distswitch`


def _ray(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )


def _submit_train(env: dict, address: str, job_id: str, out: Path, betons: Path, *extra: str, timeout: int = 300):
    """`ray job submit` of a short `distswitch train` of the shipped LeNet5 config as cluster/README.md
    shows it; `extra`: its overrides, and `--no-wait` to return once the job is submitted."""
    flags = [e for e in extra if e.startswith("--")]
    overrides = [e for e in extra if not e.startswith("--")]
    return _ray(
        "job",
        "submit",
        *flags,
        "--address",
        address,
        "--submission-id",
        job_id,
        "--working-dir",
        ".",
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--",
        "distswitch",
        "train",
        "configs/fashion_lenet5.yaml",
        f"out_dir={out}",
        *overrides,
        "schedule.warmup_epochs=0",
        "schedule.finetune_epochs=0",
        "budget.fraction=null",
        "data.train_limit=2000",
        "train.progress=false",
        # /data is not uploaded: the .beton files are on "shared storage", as cluster/README.md says.
        f"data.beton_dir={betons}",
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`make head`: `ray start --head` bound to 127.0.0.1, token authentication on."""
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # jobs use the default store (conftest sets one for the tests)
    gcs, dash = free_port(), free_port()
    # The documented way (cluster/README.md's first section): `make head`, then RAY_AUTH_MODE=token.
    started = subprocess.run(
        ["make", "--no-print-directory", "head", f"HEAD_PORT={gcs}", f"DASHBOARD_PORT={dash}"],
        env={k: v for k, v in env.items() if k != "RAY_AUTH_MODE"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    try:
        yield {**env, "DISTSWITCH_TEST_GCS": str(gcs)}, f"http://127.0.0.1:{dash}"
    finally:
        _ray("stop", "--force", env=env, timeout=120)


def test_ray_job_submit_runs_distswitch_train_to_success(head, tmp_path, fashion_betons):
    env, address = head
    out = tmp_path / "job"
    job_id = f"distswitch-test-{uuid.uuid4().hex[:8]}"
    submit = _submit_train(env, address, job_id, out, fashion_betons, "train.epochs=2", timeout=600)
    status = _ray("job", "status", "--address", address, job_id, env=env)
    # `ray job status` ends with "Job '<id>' succeeded" (coloured) for status SUCCEEDED.
    assert f"Job '{job_id}' succeeded" in status.stdout.replace("\x1b[32m", "").replace("\x1b[39m", ""), (
        status.stdout[-2000:] + submit.stdout[-3000:] + submit.stderr[-3000:]
    )
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


def test_ray_job_stop_ends_the_run_killed_with_its_checkpoints_kept(head, tmp_path, fashion_betons):
    """`ray job stop` sends SIGTERM to the entrypoint: the run ends as a signal ends it, not RUNNING."""
    env, address = head
    out = tmp_path / "stopped"
    job_id = f"distswitch-test-{uuid.uuid4().hex[:8]}"
    submit = _submit_train(env, address, job_id, out, fashion_betons, "train.epochs=6", "--no-wait")
    assert submit.returncode == 0, submit.stderr[-3000:]
    first = out / "ray" / out.name / "epoch_0000"
    deadline = time.time() + 300
    while not first.is_dir():
        assert time.time() < deadline, _ray("job", "logs", "--address", address, job_id, env=env).stdout[-3000:]
        time.sleep(0.5)
    stop = _ray("job", "stop", "--address", address, job_id, env=env, timeout=120)
    assert stop.returncode == 0, stop.stderr[-3000:]
    logs = _ray("job", "logs", "--address", address, job_id, env=env).stdout
    assert "stopped by SIGTERM; run the same command again" in logs, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED" and run.data.tags["distswitch.signal"] == "SIGTERM"
    assert first.is_dir() and not (out / "summary.json").exists()


def test_a_client_without_token_authentication_is_told_the_exact_commands_in_the_last_line(head, tmp_path):
    env, address = head
    gcs = env["DISTSWITCH_TEST_GCS"]
    client_env = {**{k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    proc = subprocess.run(
        [str(BIN / "distswitch"), "train", "configs/fashion_lenet5.yaml", f"out_dir={tmp_path / 'run'}"],
        env=client_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    # Ray's GCS client prints its retries (InvalidAuthToken) first; distswitch's line is the last.
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("distswitch: error: RAY_ADDRESS="), proc.stderr[-3000:]
    assert "token authentication" in line and "`export RAY_AUTH_MODE=token`" in line and "ray get-auth-token" in line


def test_dashboard_and_job_server_listen_on_loopback_only(head):
    _, address = head
    port = int(address.rsplit(":", 1)[1])
    hosts = {
        c.laddr.ip
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }
    assert hosts == {"127.0.0.1"}, hosts
