"""`distswitch tune`: a real (tiny) Ray Tune search, each trial a TorchTrainer through the launch
code, one MLflow parent run with a nested child run per trial, and the best config written."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import DEFAULT_CONFIG
from distswitch.cli import main
from distswitch.config import ConfigError, load_config
from distswitch.tune import max_concurrent, trial_config


def test_a_trial_config_takes_the_trial_values_and_its_own_out_dir(tmp_path):
    cfg = load_config(DEFAULT_CONFIG)
    trial = trial_config(cfg.to_dict(), {"switcher.width": 8, "optim.snn.lr": 0.002}, tmp_path / "t", "t0", "sqlite:///x.db")
    assert trial.switcher.width == 8 and trial.optim.snn.lr == 0.002
    assert trial.out_dir == str(tmp_path / "t") and trial.distributed.name == "t0"
    assert trial.tracking.uri == "sqlite:///x.db" and trial.tune.space == {}
    assert trial.model == cfg.model and trial.train == cfg.train


@pytest.mark.parametrize("space, key", [
    ("{switcher.widht: {choice: [8]}}", "switcher.widht"),
    ("{switcher.width: {choice: [0]}}", "switcher.width"),
    ("{optim.snn.lr: {loguniform: [0.1, 0.01]}}", "optim.snn.lr"),
    ("{switcher.width: {normal: [1, 2]}}", "switcher.width"),
])
def test_a_bad_search_space_names_the_key(space, key):
    with pytest.raises(ConfigError, match=f"tune.space.{key}"):
        load_config(DEFAULT_CONFIG, [f"tune.space={space}"])


class _Cluster:
    def __init__(self, cpus: float, gpus: float = 0) -> None:
        self.resources = {"CPU": cpus, "GPU": gpus}

    def cluster_resources(self) -> dict:
        return self.resources


@pytest.mark.parametrize("cpus, gpus, overrides, expected", [
    (2, 0, [], 1),  # 1 worker x 1 CPU + the trial driver's sliver: only one fits in 2 CPUs
    (16, 0, ["distributed.num_workers=2"], 7),
    (64, 8, ["distributed.use_gpu=true", "distributed.num_workers=2"], 4),  # GPUs bound it
    (2, 0, ["tune.max_concurrent_trials=3"], 3),
])
def test_concurrent_trials_follow_the_cluster_and_the_workers_per_trial(cpus, gpus, overrides, expected):
    cfg = load_config(DEFAULT_CONFIG, ["train.batch_size=128", *overrides])
    assert max_concurrent(_Cluster(cpus, gpus), cfg) == expected


@pytest.mark.slow
def test_tiny_tune_reports_every_trial_nests_their_runs_and_writes_the_best_config(tmp_path):
    out = tmp_path / "search"
    status = main(["tune", str(DEFAULT_CONFIG), f"out_dir={out}", "tune.num_samples=1", "train.epochs=1",
                   "schedule.warmup_epochs=0", "schedule.finetune_epochs=0", "data.train_limit=1024",
                   "distributed.num_workers=1", "train.progress=false",
                   "tune.space={switcher.width: {choice: [8, 16]}, schedule.update_ratio: {choice: [1, 4]}}"])
    assert status == 0
    summary = json.loads((out / "tune_summary.json").read_text())
    assert summary["num_trials"] == 1 and all(r["val/acc"] is not None and r["error"] is None for r in summary["trials"])
    best = load_config(out / "best_config.yaml")
    assert best.switcher.width == summary["best"]["config"]["switcher.width"]
    assert best.schedule.update_ratio == summary["best"]["config"]["schedule.update_ratio"]
    assert best.tune.space == {} and best.distributed.name is None
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 1 and {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    assert {"trials.json", "best_config.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert len(client.search_runs([experiment])) == 2  # the parent and its child, nothing else


def test_a_trial_that_ends_without_closing_its_run_is_closed_killed(tmp_path):
    from distswitch.config import Config
    from distswitch.tracking import mlflow_client, open_run
    from distswitch.tune import TRIAL_TAG, close_runs_callback

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
