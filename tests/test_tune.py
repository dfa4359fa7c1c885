"""`distswitch tune`: a real (tiny) Ray Tune search, each trial a TorchTrainer through the launch
code, one MLflow parent run with a nested child run per trial, and the best config written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import DEFAULT_CONFIG, REPO_ROOT, kill_ray_processes, ray_processes
from distswitch.config import ConfigError, load_config
from distswitch.driver.tune import TRIAL_TAG, max_concurrent, trial_config


def test_a_trial_config_takes_the_trial_values_and_its_own_out_dir(tmp_path):
    cfg = load_config(DEFAULT_CONFIG)
    trial = trial_config(
        cfg.to_dict(), {"switcher.width": 8, "optim.snn.lr": 0.002}, tmp_path / "t", "t0", "sqlite:///x.db"
    )
    assert trial.switcher.width == 8 and trial.optim.snn.lr == 0.002
    assert trial.out_dir == str(tmp_path / "t") and trial.distributed.name == "t0"
    assert trial.tracking.uri == "sqlite:///x.db" and trial.tune.space == {}
    assert trial.model == cfg.model and trial.train == cfg.train


@pytest.mark.parametrize(
    "space, key",
    [
        ("{switcher.widht: {choice: [8]}}", "switcher.widht"),
        ("{switcher.width: {choice: [0]}}", "switcher.width"),
        ("{optim.snn.lr: {loguniform: [0.1, 0.01]}}", "optim.snn.lr"),
        ("{switcher.width: {normal: [1, 2]}}", "switcher.width"),
    ],
)
def test_a_bad_search_space_names_the_key(space, key):
    with pytest.raises(ConfigError, match=f"tune.space.{key}"):
        load_config(DEFAULT_CONFIG, [f"tune.space={space}"])


class _Cluster:
    def __init__(self, cpus: float, gpus: float = 0) -> None:
        self.resources = {"CPU": cpus, "GPU": gpus}

    def cluster_resources(self) -> dict:
        return self.resources


@pytest.mark.parametrize(
    "cpus, gpus, overrides, expected",
    [
        (2, 0, ["distributed.num_workers=1"], 2),  # the trial's driver takes no CPU: two 1-worker trials in 2 CPUs
        (16, 0, ["distributed.num_workers=2"], 8),
        (16, 0, ["distributed.num_workers=[2,4]"], 4),  # elastic: counted at its largest
        (64, 8, ["distributed.use_gpu=true", "distributed.num_workers=2"], 4),  # GPUs bound it
        (2, 0, ["distributed.num_workers=1", "tune.max_concurrent_trials=3"], 3),
    ],
)
def test_concurrent_trials_follow_the_cluster_and_the_workers_per_trial(cpus, gpus, overrides, expected):
    cfg = load_config(DEFAULT_CONFIG, ["train.batch_size=128", *overrides])
    assert max_concurrent(_Cluster(cpus, gpus), cfg) == expected


def test_a_trial_that_fits_nowhere_in_the_cluster_is_refused_in_one_line():
    # 3 workers x 1 CPU > 2 CPUs: it would wait for ever.
    cfg = load_config(DEFAULT_CONFIG, ["distributed.num_workers=3"])
    with pytest.raises(ConfigError, match="one trial needs 3 CPU"):
        max_concurrent(_Cluster(2), cfg)


@pytest.mark.slow
def test_asha_stops_a_weak_trial_mid_run_and_a_killed_search_resumes_with_no_duplicate_run(tmp_path):
    # Four trials in grid order, one at a time (tune.max_concurrent_trials=1): a learning one, two that cannot learn (tnn
    # lr 1e-6), a learning one. ASHA's first rung (1 epoch of 3) stops trial 2 below trial 1. The
    # driver is SIGKILLed inside trial 3's second epoch (with its local cluster), long enough after
    # trial 2's stop for Tune to have saved its experiment state (every >= 10 s); the same command
    # restores it. Tune does not save the scheduler: the restored search's ASHA starts empty, so
    # trial 3 (first to report) runs on, and trial 4 learns, so beats it at every rung, wherever in
    # its epochs trial 3 resumed (a kill before or after Train registers its epoch-1 checkpoint).
    out = tmp_path / "search"
    command = [
        sys.executable,
        "-m",
        "distswitch.cli",
        "tune",
        str(DEFAULT_CONFIG),
        f"out_dir={out}",
        "tune.num_samples=1",
        "train.epochs=3",
        "schedule.warmup_epochs=0",
        "schedule.finetune_epochs=0",
        "budget.fraction=null",
        "data.train_limit=1024",
        "distributed.num_workers=1",
        "train.progress=false",
        "tune.grace_period=1",
        "tune.reduction_factor=2",
        "tune.max_concurrent_trials=1",
        "tune.space={optim.tnn.lr: {grid: [0.05, 1.0e-6, 1.0e-6, 0.05]}}",
    ]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 400
        while not list((out / "ray").glob("_trial_*_00002/epoch_0000")):  # trial 3's first epoch checkpoint
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "the third trial never finished its first epoch"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert not list((out / "ray").glob("_trial_*_00002/epoch_0002")), "the kill must land inside trial 3"
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    kill_ray_processes()  # its local cluster with it, as when the machine or pod dies
    killed_at = time.time()
    assert not (out / "tune_summary.json").exists()

    rerun = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "resuming the search in" in rerun.stdout + rerun.stderr

    summary = json.loads((out / "tune_summary.json").read_text())
    rows = sorted(summary["trials"], key=lambda r: r["trial"])
    assert [r["config.optim.tnn.lr"] for r in rows] == [0.05, 1e-6, 1e-6, 0.05]
    assert all(r["error"] is None for r in rows)
    assert rows[1]["epochs_reported"] == 1  # stopped at the first rung: of 3 epochs + the final report
    assert rows[0]["epochs_reported"] == 4 and rows[0]["test/acc"] is not None
    assert summary["best"]["config"] == {"optim.tnn.lr": 0.05}
    best = load_config(out / "best_config.yaml")
    assert best.optim.tnn.lr == 0.05 and best.tune.space == {} and best.distributed.name is None

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_lr = sorted(children, key=lambda c: (-float(c.data.params["optim.tnn.lr"]), c.info.start_time))
    assert len({c.data.tags[TRIAL_TAG] for c in children}) == 4  # one run per trial, the resumed one included
    # by_lr: trials 1, 4, 2, 3. Trial 3's run is the one the rerun continued. (Its Train run resumes
    # from its last checkpoint that Train registered; the kill may land before epoch 1's is, and
    # then it starts over.)
    assert [c.data.tags.get("distswitch.relaunches") for c in by_lr] == [None, None, None, "1"]
    assert [c.info.status for c in by_lr] == ["FINISHED", "FINISHED", "KILLED", "FINISHED"]
    assert by_lr[2].data.tags["distswitch.stopped_by"].startswith("tune")
    assert {"trials.json", "best_config.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert len(client.search_runs([experiment])) == 5  # the parent and its 4 children, nothing else
    while left := ray_processes():  # the rerun closed its own cluster
        names = sorted({" ".join(p.info["cmdline"] or [])[:60] for p in left})
        assert time.time() < killed_at + 600, f"Ray processes left after the rerun: {names}"
        time.sleep(1)


def test_a_trial_that_ends_without_closing_its_run_is_closed_killed(tmp_path):
    from distswitch.config import Config
    from distswitch.delivery import mlflow_client
    from distswitch.driver.tune import TRIAL_TAG, close_runs_callback
    from distswitch.tracking import open_run

    cfg = Config.from_dict({"out_dir": str(tmp_path / "search")})
    uri, parent = open_run(cfg, "store/search")
    _, child = open_run(cfg, "store/trial_0", parent_run_id=parent)
    _, done = open_run(cfg, "store/trial_1", parent_run_id=parent)
    client = mlflow_client(uri)
    client.set_tag(child, TRIAL_TAG, "abc_00000")
    client.set_tag(done, TRIAL_TAG, "abc_00001")
    client.set_terminated(done, "FINISHED")

    class Trial:  # what Tune hands its callbacks: only the id is read
        def __init__(self, trial_id: str) -> None:
            self.trial_id = trial_id

    callback = close_runs_callback(uri)
    callback.on_trial_complete(0, [], Trial("abc_00000"))
    callback.on_trial_error(0, [], Trial("abc_00001"))
    assert client.get_run(child).info.status == "KILLED"
    assert client.get_run(done).info.status == "FINISHED"  # a closed run is left as it is
    assert client.get_run(parent).info.status == "RUNNING"


@pytest.mark.slow
def test_a_search_and_a_training_started_together_on_one_machine_both_finish(
    tmp_path, tracking_server, server_experiment
):
    # Each starts its own local cluster; Train's placement-group cleaner used to find both by
    # auto-detection ("Found multiple active Ray instances") and the search's next trial never started.
    # Both log to the team's tracking server (`make tracking-server`).
    quick = [
        "train.epochs=2",
        "schedule.warmup_epochs=0",
        "schedule.finetune_epochs=0",
        "budget.fraction=null",
        "data.train_limit=512",
        "distributed.num_workers=1",
        "train.progress=false",
        f"tracking.uri={tracking_server}",
        f"tracking.experiment={server_experiment}",
    ]
    search = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distswitch.cli",
            "tune",
            str(DEFAULT_CONFIG),
            *quick,
            f"out_dir={tmp_path / 'search'}",
            "tune.num_samples=1",
            "tune.space={optim.tnn.lr: {grid: [0.05, 0.02, 0.01]}}",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(15)
    train = subprocess.run(
        [sys.executable, "-m", "distswitch.cli", "train", str(DEFAULT_CONFIG), *quick, f"out_dir={tmp_path / 'train'}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        out, _ = search.communicate(timeout=600)
    finally:
        if search.poll() is None:
            search.kill()
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert search.returncode == 0, out[-3000:]
    assert "multiple active Ray instances" not in out + train.stdout + train.stderr
    summary = json.loads((tmp_path / "search" / "tune_summary.json").read_text())
    assert len(summary["trials"]) == 3
    client = MlflowClient(tracking_server)
    runs = client.search_runs([client.get_experiment_by_name(server_experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.run_name.endswith("(search)")]
    assert len(parents) == 1 and len(runs) == 1 + 3 + 1  # the search, its 3 trials, the training
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(trials) == 3 and parents[0].info.status == "FINISHED"
    # A trial ASHA stops early is closed KILLED; every other run FINISHED, none left RUNNING.
    assert {r.info.status for r in trials} <= {"FINISHED", "KILLED"}
    assert all(r.info.status == "FINISHED" for r in runs if r not in trials), [
        (r.info.run_name, r.info.status) for r in runs
    ]
