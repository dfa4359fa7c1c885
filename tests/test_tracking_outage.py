"""A team's tracking server that goes away mid-run: training goes on, and everything arrives once it is back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT, TEST_CONFIG_YAML, TrackingServer, free_port

pytestmark = pytest.mark.slow

EPOCHS = 8


def _journal_steps(out) -> list[int]:
    path = out / "mlflow-outbox" / "rank0.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for(predicate, proc, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.2)


def test_a_run_whose_server_is_away_for_two_epochs_ends_finished_with_every_metric_once_and_its_model(
    tracking_server, tmp_path
):
    # tracking_server: PostgreSQL is up and the database exists; this test's server is its own (it stops it).
    server = TrackingServer(free_port(), tmp_path)
    server.start()
    config = tmp_path / "c.yaml"
    config.write_text(TEST_CONFIG_YAML)
    out = tmp_path / "run"
    experiment = f"outage-{uuid.uuid4().hex[:8]}"
    # MLflow's client would retry a refused connection for minutes: turned down, so the outage is short.
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distswitch.cli",
            "train",
            str(config),
            f"out_dir={out}",
            f"train.epochs={EPOCHS}",
            "schedule.warmup_epochs=1",
            "data.train_limit=12800",
            "data.loader=torch",
            "distributed.num_workers=1",
            f"tracking.uri={server.uri}",
            f"tracking.experiment={experiment}",
            "tracking.system_metrics_interval=1",
            "tracking.send_timeout=180",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: 0 in _journal_steps(out), proc, 300, "epoch 1's metrics")
        server.stop()
        away = time.time() * 1000
        down_at = max(_journal_steps(out))
        _wait_for(lambda: max(_journal_steps(out)) >= down_at + 2, proc, 300, "two more epochs")
        during = [s for s in _journal_steps(out) if s > down_at]
        back = time.time() * 1000
        server.start()
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 0, stderr[-3000:]
    assert len(during) >= 2  # epochs that ended while the server was away
    warnings = [line for line in stderr.splitlines() if "is not taking what the run logs" in line]
    assert len(warnings) == 1, stderr[-3000:]
    server.start()  # read back what it has
    try:
        client = MlflowClient(server.uri)
        summary = json.loads((out / "summary.json").read_text())
        run = client.get_run(summary["mlflow"]["run_id"])
        assert run.info.status == "FINISHED"
        for key in ("val/acc", "tnn/loss", "seconds"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(EPOCHS)), key
        assert run.data.metrics["best/test_acc"] == pytest.approx(summary["test_acc"])
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"summary.json", "model.arch.json", "figures", "config.yaml"} <= files
        assert client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        # The node's system metrics every second, those sampled while the server was away included.
        [cpu] = [k for k in run.data.metrics if k.startswith("system/") and k.endswith("/cpu_utilization_percentage")]
        samples = client.get_metric_history(run.info.run_id, cpu)
        assert sorted(m.step for m in samples) == list(range(len(samples)))
        assert sum(away < m.timestamp < back for m in samples) >= 3, (away, back, [m.timestamp for m in samples])
        # No epoch waited for the server: those that ended during the outage took no longer than the rest.
        seconds = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "seconds")}
        calm = [v for step, v in seconds.items() if step not in during and step > 0]
        assert max(seconds[s] for s in during) < 1.5 * max(calm) + 1.0, seconds
    finally:
        server.stop()
