"""MLflow tracking against a real MLflow store (sqlite): one run per training run, re-opened on a
resume, marked FAILED with its error, and a clear error for a server that cannot be reached."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT, make_config
from distswitch.cli import main
from distswitch.config import ConfigError, load_config
from distswitch.delivery import EpochLogger, log_metrics, outbox_dir
from distswitch.outbox import Journal, unsent
from distswitch.tracking import RUN_KEY_TAG, fail_run, flatten, open_run

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from mlflow_screenshot import serve  # noqa: E402  (the same `make ui` start the browser test uses)


def _cfg(tmp_path, **sections):
    return make_config(out_dir=str(tmp_path / "run"), **sections)


def test_a_new_run_holds_the_flattened_config_and_config_yaml(tmp_path, mlflow_store):
    cfg = _cfg(tmp_path, switcher={"width": 24})
    uri, run_id = open_run(cfg, "store/run")
    assert uri == mlflow_store
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "run"
    assert run.data.params["switcher.width"] == "24" and run.data.params["optim.tnn.lr"] == "0.05"
    assert set(run.data.params) == set(flatten(cfg.to_dict()))
    assert run.data.tags[RUN_KEY_TAG] == "store/run"
    assert "config.yaml" in [a.path for a in MlflowClient(uri).list_artifacts(run_id)]


def test_without_a_uri_every_run_launched_from_a_directory_lands_in_its_one_store(tmp_path, monkeypatch):
    """MLflow's own default, ./mlflow.db with artifacts in ./mlruns: a plain `mlflow ui` there shows
    every run; experiments are named by config, runs by their out_dir."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    (project / "a.yaml").write_text("method: switch\n")
    first = open_run(load_config(project / "a.yaml", ["out_dir=outputs/one"]), "k1")
    second = open_run(load_config(project / "a.yaml", ["out_dir=outputs/two", "method=magnitude"]), "k2")
    other = open_run(load_config(None, ["out_dir=/elsewhere/three"]), "k3")
    assert first[0] == second[0] == other[0] == f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(first[0])
    runs = {client.get_run(run_id).info.run_name: client.get_run(run_id) for _, run_id in (first, second, other)}
    assert set(runs) == {"one", "two", "three"}
    names = {r.info.run_name: client.get_experiment(r.info.experiment_id).name for r in runs.values()}
    assert names == {"one": "a", "two": "a", "three": "distswitch"}
    location = client.get_experiment(runs["one"].info.experiment_id).artifact_location
    assert location == (project / "mlruns" / "a").as_uri()


def test_a_submitted_ray_job_keeps_its_store_beside_its_out_dir(tmp_path, monkeypatch):
    # The job's working directory is Ray's temporary copy of --working-dir, gone with the job.
    from distswitch.tracking import RAY_JOB_ENV, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    assert tracking_uri(_cfg(tmp_path)) == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_an_unfinished_run_is_continued_not_duplicated(tmp_path):
    cfg = _cfg(tmp_path)
    uri, first = open_run(cfg, "store/run")
    log_metrics(uri, first, {"val/acc": 0.5}, step=0)
    fail_run(uri, first, tmp_path, RuntimeError("worker lost"), timeout=30)
    _, second = open_run(cfg, "store/run")
    assert second == first
    client = MlflowClient(uri)
    assert client.get_run(first).info.status == "RUNNING"
    assert len(client.search_runs([client.get_run(first).info.experiment_id])) == 1


def test_a_relaunch_first_sends_the_last_attempt_s_unsent_end_then_runs(tmp_path):
    """A FAILED end that waited in the outbox (the server was away when the driver failed) is sent
    when the same run is opened again, before it is marked RUNNING: not later, mid-relaunch."""
    cfg = _cfg(tmp_path)
    uri, first = open_run(cfg, "store/run")
    journal = Journal(outbox_dir(cfg.out_dir), "driver")
    journal.append(
        {
            "kind": "end",
            "uri": uri,
            "run_id": first,
            "timestamp": 1,
            "status": "FAILED",
            "tags": {"distswitch.error": "RuntimeError: worker lost"},
        }
    )
    assert unsent(outbox_dir(cfg.out_dir)) == 1
    _, second = open_run(cfg, "store/run")
    run = MlflowClient(uri).get_run(first)
    assert second == first and run.info.status == "RUNNING" and "worker lost" in run.data.tags["distswitch.error"]
    assert unsent(outbox_dir(cfg.out_dir)) == 0


def test_a_finished_run_is_never_reopened(tmp_path):
    cfg = _cfg(tmp_path)
    uri, first = open_run(cfg, "store/run")
    MlflowClient(uri).set_terminated(first, "FINISHED")
    _, second = open_run(cfg, "store/run")
    assert second != first


@pytest.mark.parametrize("error, status", [(ValueError("loss is NaN"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_failed_run_is_marked_with_its_error(tmp_path, error, status):
    uri, run_id = open_run(_cfg(tmp_path), "store/run")
    fail_run(uri, run_id, tmp_path, error, timeout=30)
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == status and type(error).__name__ in run.data.tags["distswitch.error"]


def test_metrics_are_logged_per_epoch_step(tmp_path):
    uri, run_id = open_run(_cfg(tmp_path), "store/run")
    logger = EpochLogger(uri, run_id, tmp_path)
    for epoch in range(3):
        logger.log({"val/acc": 0.1 * epoch, "tnn/loss": 1.0, "note": "not a number"}, step=epoch)
    logger.close(timeout=30)
    history = MlflowClient(uri).get_metric_history(run_id, "val/acc")
    assert [m.step for m in history] == [0, 1, 2]
    assert "note" not in MlflowClient(uri).get_run(run_id).data.metrics


def test_an_unreachable_tracking_server_is_one_line_and_exit_2_in_seconds(config_file, out_dir, capsys):
    start = time.time()
    status = main(
        ["train", str(config_file), f"out_dir={out_dir}", "tracking.uri=http://127.0.0.1:9", "train.progress=false"]
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "tracking.uri" in lines[0]
    assert time.time() - start < 30


def test_open_run_refuses_an_unusable_store(tmp_path):
    with pytest.raises(ConfigError, match="tracking.uri"):
        open_run(_cfg(tmp_path, tracking={"uri": "http://127.0.0.1:9"}), "k")


def test_runs_lists_each_run_with_its_settings_and_results(tmp_path, capsys):
    cfg = _cfg(tmp_path, switcher={"width": 24}, schedule={"update_ratio": 2})
    uri, run_id = open_run(cfg, "store/run")
    log_metrics(
        uri,
        run_id,
        {
            "best/test_acc": 0.8765,
            "best/val_acc": 0.88,
            "best/kept_fraction": 0.5,
            "best/compact_params": 12345,
            "best/compact_macs": 67890,
        },
        step=3,
    )
    MlflowClient(uri).set_terminated(run_id, "FINISHED")
    assert main(["runs"]) == 0  # the store MLFLOW_TRACKING_URI names
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split() == [
        "experiment",
        "run",
        "status",
        "method",
        "model",
        "budget",
        "val_acc",
        "test_acc",
        "kept",
        "params",
        "macs",
    ]
    assert row.split() == [
        "distswitch",
        "run",
        "FINISHED",
        "switch",
        "lenet5",
        "-",
        "0.8800",
        "0.8765",
        "50.0%",
        "12,345",
        "67,890",
    ]


def test_runs_lists_every_experiment_and_sorts_by_a_metric(tmp_path, capsys):
    for name, experiment, acc in (("a", "one", 0.7), ("b", "two", 0.9), ("c", "one", 0.8)):
        uri, run_id = open_run(make_config(out_dir=str(tmp_path / name), tracking={"experiment": experiment}), name)
        log_metrics(uri, run_id, {"best/test_acc": acc}, step=0)
    assert main(["runs", "--sort", "test_acc"]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert rows == [["two", "b"], ["one", "c"], ["one", "a"]]
    assert main(["runs", "--experiment", "one"]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.strip().splitlines()[1:]] == ["c", "a"]  # newest first


def test_runs_without_a_store_says_how_to_name_one(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["runs"]) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert main(["runs", "--out-dir", str(tmp_path)]) == 2


@pytest.mark.slow
def test_make_ui_serves_the_store_on_loopback_only(tmp_path):
    # It once found no listener within 120 s in a full run: `mlflow ui` started MLflow's default 4
    # workers, each importing all of MLflow, on 2 cores still shared with the previous test's Ray
    # processes (70 s under load, against 29 s with the one worker `make ui` now asks for). The wait
    # is for the server's own answer, and a server that exits says why.
    open_run(_cfg(tmp_path), "store/run")
    with serve(tmp_path) as url:  # `make ui` on a free port, once the server answers /health (else it raises)
        port = int(url.rsplit(":", 1)[1])
        hosts = {
            c.laddr.ip
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert hosts == {"127.0.0.1"}, hosts


@pytest.mark.parametrize("before", [None, "sqlite:///elsewhere.db"])
def test_logging_the_model_leaves_the_processs_tracking_uri_as_it_was(before, monkeypatch, tmp_path):
    import mlflow

    from distswitch.run_results import global_tracking_uri

    if before is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
    mlflow.set_tracking_uri(before)
    with global_tracking_uri(f"sqlite:///{tmp_path / 'x.db'}"):
        assert os.environ["MLFLOW_TRACKING_URI"].endswith("x.db")
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    cfg = _cfg(tmp_path)
    from distswitch.tracking import tracking_uri

    monkeypatch.chdir(tmp_path)
    assert tracking_uri(cfg) == (before or f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_marking_a_run_failed_in_a_store_that_is_gone_only_warns(tmp_path, capsys):
    from distswitch.tracking import fail_run

    start = time.time()
    fail_run(
        "http://127.0.0.1:9", "abc", tmp_path, RuntimeError("the real error"), timeout=30
    )  # port 9: nothing listens
    err = capsys.readouterr().err
    assert "could not mark MLflow run abc FAILED" in err and f"distswitch sync {tmp_path.resolve()}" in err
    assert time.time() - start < 15  # not MLflow's minutes of retries


@pytest.mark.parametrize(
    "name", ["fashion-lenet5", "a b", "", " ", "a/b", "a:b", "..", ".", "a//b", "./a", "../a", "a/"]
)
def test_a_registered_model_name_is_refused_exactly_when_mlflow_would_refuse_it(name):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
        mlflow_ok = True
    except MlflowException:
        mlflow_ok = False
    if mlflow_ok:
        assert make_config(tracking={"register": name}).tracking.register == name
    else:
        with pytest.raises(ConfigError, match="tracking.register"):
            make_config(tracking={"register": name})


@pytest.mark.slow
def test_registered_versions_carry_their_tags_and_best_loads_in_a_fresh_process_as_model_pt(tmp_path, mlflow_store):
    import json
    import sys

    import torch

    from distswitch.tracking import finish_run
    from distswitch.worker import train

    summaries = {}
    for seed in (0, 1):
        cfg = load_config(
            REPO_ROOT / "configs/fashion_mlp.yaml",
            [
                "train.progress=false",
                "train.device=cpu",
                "train.epochs=3",
                "schedule.warmup_epochs=1",
                "schedule.finetune_epochs=1",
                "prune.finetune_epochs=1",
                "data.train_limit=2000",
                "data.val_size=500",
                "data.loader=torch",
                "distributed.num_workers=1",
                "tracking.enabled=false",
                f"train.seed={seed}",
                "tracking.register=fashion-mlp-macs50",
                f"out_dir={tmp_path / f'run{seed}'}",
            ],
        )
        summary = train(cfg)
        uri, run_id = open_run(cfg, f"registry/{seed}")
        assert finish_run(uri, run_id, tmp_path / f"run{seed}", summary, timeout=120)
        summaries[seed] = summary
    client = MlflowClient(mlflow_store)
    versions = {str(v.version): v for v in client.search_model_versions("name = 'fashion-mlp-macs50'")}
    assert sorted(versions) == ["1", "2"]
    for version, seed in (("1", 0), ("2", 1)):
        tags = versions[version].tags
        assert tags["method"] == "switch" and tags["budget"] == "macs:0.5" and tags["meets_budget"] == "true"
        assert float(tags["val_acc"]) == pytest.approx(summaries[seed]["val_acc"], abs=1e-6)
        assert int(tags["compact_macs"]) == summaries[seed]["compact"]["macs"]
        assert tags["git_commit"] == (summaries[seed]["git_sha"] or "unknown")
    best_seed = max((0, 1), key=lambda s: (summaries[s]["val_acc"], s))
    assert str(client.get_model_version_by_alias("fashion-mlp-macs50", "best").version) == str(best_seed + 1)
    import mlflow

    from distswitch.run_results import global_tracking_uri

    with global_tracking_uri(mlflow_store):
        info = mlflow.models.get_model_info("models:/fashion-mlp-macs50@best")
        files = Path(
            mlflow.artifacts.download_artifacts("models:/fashion-mlp-macs50@best", dst_path=str(tmp_path / "dl"))
        )
    assert info.signature is not None and info.saved_input_example_info is not None
    assert [p.name for p in files.rglob("model.arch.json")] == ["model.arch.json"]
    # A fresh process with plain MLflow (no distswitch import) gets the same outputs as model.pt.
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, mlflow, torch; x = torch.load(sys.argv[1]); "
        "m = mlflow.pytorch.load_model('models:/fashion-mlp-macs50@best'); "
        "torch.save(m(x).detach(), sys.argv[2])"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_store},
        timeout=300,
    )
    from distswitch.export import load_compact

    expected = load_compact(tmp_path / f"run{best_seed}" / "model.pt")(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected.detach())
    assert (
        json.loads((tmp_path / f"run{best_seed}" / "summary.json").read_text())["val_acc"]
        == summaries[best_seed]["val_acc"]
    )


def test_system_metrics_are_sampled_every_10_s_by_default_and_can_be_switched_off():
    from distswitch.delivery import system_metrics_interval

    assert system_metrics_interval(make_config()) == 10.0
    assert system_metrics_interval(make_config(tracking={"system_metrics": False})) is None


def test_the_team_s_tracking_server_keeps_runs_in_postgresql_and_serves_their_artifacts(
    tracking_server, server_experiment, tmp_path, capsys
):
    cfg = make_config(out_dir=str(tmp_path / "run"), tracking={"uri": tracking_server, "experiment": server_experiment})
    uri, run_id = open_run(cfg, "server/run")
    assert uri == tracking_server
    log_metrics(uri, run_id, {"best/test_acc": 0.8765, "best/val_acc": 0.88}, step=3)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server: no shared disk
    assert client.list_artifacts(run_id) and "config.yaml" in {a.path for a in client.list_artifacts(run_id)}
    client.set_terminated(run_id, "FINISHED")
    capsys.readouterr()  # MLflow's own "View run at <url>" line
    assert main(["runs", "--uri", tracking_server, "--experiment", server_experiment]) == 0
    printed = capsys.readouterr().out
    header, row = printed.strip().splitlines()
    assert row.split()[:3] == [server_experiment, "run", "FINISHED"] and "0.8765" in row.split(), printed


def test_sync_sends_what_a_run_left_in_its_outbox_once_and_says_so(tmp_path, capsys, monkeypatch):
    from distswitch.delivery import OUTBOX, outbox_entry
    from distswitch.outbox import Journal

    uri, run_id = open_run(_cfg(tmp_path), "store/run")
    out = tmp_path / "run"
    journal = Journal(out / OUTBOX, "driver")  # what a run left when its server was away at the end
    journal.append(outbox_entry("metrics", uri, run_id, step=0, metrics={"val/acc": 0.5}, epoch=True))
    journal.append(outbox_entry("end", uri, run_id, status="FINISHED"))
    assert main(["sync", str(out)]) == 0
    assert "sent 2 entries" in capsys.readouterr().out
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "val/acc")] == [0.5]
    assert main(["sync", str(out)]) == 0
    assert "nothing to send" in capsys.readouterr().out
    # A server still away: one line, exit 1, the entries kept.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    journal.append(outbox_entry("metrics", "http://127.0.0.1:9", run_id, step=1, metrics={"val/acc": 0.6}, epoch=True))
    assert main(["sync", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "1 unsent, kept in" in err[0]
