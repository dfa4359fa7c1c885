"""`distswitch sweep`: methods x budgets x seeds as one Ray Tune experiment, compared at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT, kill_ray_processes
from distswitch.cli import main

CONFIG = REPO_ROOT / "configs" / "sweep_fashion_lenet5.yaml"
SHORT = [
    "train.epochs=3",
    "data.train_limit=1280",
    "data.val_size=500",
    "data.loader=torch",
    "train.progress=false",
    "train.device=cpu",
    "tracking.system_metrics=false",
]


def _command(out, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "distswitch.cli", "sweep", str(CONFIG), f"out_dir={out}", *SHORT, *overrides]


def _sweep(out, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(out, *overrides), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_sweep_killed_mid_trial_is_resumed_by_the_same_command_and_logs_the_comparison_to_its_parent(
    tmp_path, mlflow_store
):
    """Four trials (2 methods x 2 seeds at 50%), two at a time. The driver SIGKILLed (its local
    cluster with it, as when the machine dies) inside the third trial; the same command finishes
    the grid, each trial once (one MLflow child each), and compares them."""
    out = tmp_path / "sweep"
    command = _command(
        out,
        "sweep.methods=[switch,magnitude-gradual-group]",
        "sweep.budgets=[0.5]",
        "sweep.seeds=[0,1]",
        "tracking.experiment=sweep",
    )
    log = tmp_path / "killed.log"  # a file, not a pipe: nobody reads it while the sweep runs
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while not list((out / "ray").glob("_trial_*_00002/epoch_0000")):  # inside the third trial
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the third trial never finished its first epoch"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    kill_ray_processes()
    assert not (out / "tune_summary.json").exists()

    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming the sweep in" in proc.stdout + proc.stderr
    summary = json.loads((out / "tune_summary.json").read_text())
    assert summary["num_trials"] == 4 and not any(t["error"] for t in summary["trials"])
    rows = {row["method"]: row for row in summary["comparison"]["rows"]}
    assert set(rows) == {"switch", "magnitude-gradual-group"}
    for row in rows.values():
        assert row["seeds"] == ["0", "1"] and row["budget"] == 0.5 and abs(row["macs"][0] - 0.5) < 0.02
    assert (
        "magnitude-gradual-group" in (out / "compare.md").read_text() and (out / "compare.png").stat().st_size > 10_000
    )
    assert "| lenet5 | 50% | switch |" in proc.stdout
    client = MlflowClient(mlflow_store)
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "compare")} == {
        "compare/table.md",
        "compare/compare.png",
    }
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(
        (c.data.params["method"], c.data.params["prune.importance"], c.data.params["train.seed"], c.info.status)
        for c in children
    ) == [
        ("magnitude", "group", "0", "FINISHED"),
        ("magnitude", "group", "1", "FINISHED"),
        ("switch", "incoming", "0", "FINISHED"),
        ("switch", "incoming", "1", "FINISHED"),
    ]


@pytest.mark.slow
def test_a_sweep_whose_trial_cannot_fit_the_cluster_is_one_line_and_exit_2(tmp_path):
    proc = _sweep(tmp_path / "sweep", "distributed.num_workers=8", "sweep.seeds=[0]")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distswitch:")]
    assert proc.returncode == 2 and len(lines) == 1 and "distributed.num_workers" in lines[0], proc.stderr[-2000:]


def test_a_sweep_of_an_unknown_method_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys):
    assert main(["sweep", str(CONFIG), f"out_dir={tmp_path}", "sweep.methods=[switch,magnitude-gradul]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep.methods: unknown 'magnitude-gradul'" in err[0]
    assert not (tmp_path / "config.yaml").exists()
