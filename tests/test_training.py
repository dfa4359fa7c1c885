"""Real (short) training runs on Fashion-MNIST: the default job through the command line (a local
Ray cluster), the baselines in-process through `distswitch.worker.train` (the same training code,
without the cluster start-up)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import DEFAULT_CONFIG
from distswitch.cli import main
from distswitch.config import load_config
from distswitch.counting import count
from distswitch.data import BatchLoader, load_splits, make_loaders
from distswitch.export import load_compact
from distswitch.run_results import global_tracking_uri
from distswitch.worker import train

pytestmark = pytest.mark.slow

QUIET = ["train.progress=false", "train.device=cpu"]


def _train_in_process(out: Path, *overrides: str) -> dict:
    summary = train(load_config(DEFAULT_CONFIG, [*QUIET, *overrides, f"out_dir={out}"]))
    assert summary == json.loads((out / "summary.json").read_text())
    return summary


def _train(out: Path, *overrides: str) -> dict:
    summary_path = out.parent / f"{out.name}_summary.json"
    status = main(
        ["train", str(DEFAULT_CONFIG), *QUIET, *overrides, f"out_dir={out}", "--summary-json", str(summary_path)]
    )
    assert status == 0
    return json.loads(summary_path.read_text())


@pytest.fixture(scope="module")
def switch_run(tmp_path_factory, fashion_mnist_root) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("switch") / "run"
    # The shipped default job, shortened: 1 dense warm-up, 1 alternating and 1 fine-tuning epoch; the
    # system metrics sampled every second.
    return out, _train(
        out,
        "data.train_limit=5000",
        "train.epochs=3",
        "schedule.warmup_epochs=1",
        "schedule.finetune_epochs=1",
        "tracking.system_metrics_interval=1",
    )


def test_the_default_job_leaves_one_finished_mlflow_run_with_metrics_architecture_model_and_figures(switch_run):
    import mlflow

    out, summary = switch_run
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name("fashion_lenet5")  # named by the config file
    assert summary["mlflow"]["experiment"] == "fashion_lenet5"
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`distswitch.out_dir` = '{out.resolve()}'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_id == summary["mlflow"]["run_id"]
    run = runs[0]
    assert run.data.params["model.name"] == "lenet5" and run.data.params["train.epochs"] == "3"
    assert run.data.tags["mlflow.source.git.commit"] == summary["git_sha"]
    for key in (
        "tnn/loss",
        "val/acc",
        "val/loss",
        "kept_fraction",
        "compact/params",
        "compact/macs",
        "params_kept",
        "macs_kept",
        "tnn/lr",
        "snn/lr",
        "seconds",
        "images_per_s",
    ):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2], key
    # SNN steps run in the alternating epoch only (epoch 0 is the warm-up, epoch 2 fine-tuning).
    assert [m.step for m in client.get_metric_history(run.info.run_id, "snn/loss")] == [1]
    assert {k for k in run.data.metrics if k.startswith("kept/")} == {"kept/conv1", "kept/conv2", "kept/fc1"}
    assert run.data.metrics["test/acc"] == summary["test_acc"]
    assert "epoch" not in run.data.metrics  # the step of every metric, not a metric of its own
    # MLflow's own Dataset and Source columns: the data as a dataset input, the command as the source.
    [data] = run.inputs.dataset_inputs
    meta = json.loads((Path(summary["config"]["data"]["beton_dir"]) / "metadata.json").read_text())
    assert data.dataset.name == "fashion-mnist" and data.dataset.digest == meta["source"]["sha256"][:16]
    assert json.loads(data.dataset.profile) == {**meta["counts"], "train": 5000}
    assert run.data.tags["mlflow.source.name"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "model.arch.json", "architecture", "figures"} <= artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/kept_per_layer.png", "figures/accuracy_and_kept.png"} <= figures
    (out.parent / "dl").mkdir(exist_ok=True)
    kept = json.loads(
        Path(client.download_artifacts(run.info.run_id, "architecture/kept.json", str(out.parent / "dl"))).read_text()
    )
    assert kept["widths"] == summary["widths"]
    # The logged model reproduces the logged test accuracy on the test split.
    with global_tracking_uri(summary["mlflow"]["tracking_uri"]):  # a bare set_tracking_uri leaks into later tests
        logged = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
        assert len(logged) == 1 and logged[0].source_run_id == run.info.run_id
        model = mlflow.pytorch.load_model(logged[0].model_uri)
        # Saved with torch.export (pt2): loading unpickles none of distswitch's classes.
        files = Path(mlflow.artifacts.download_artifacts(logged[0].model_uri)).rglob("model.*")
        assert sorted(p.name for p in files) == [
            "model.arch.json",
            "model.pt2",
        ]  # no pickle; the architecture beside it
    test = make_loaders(load_config(out / "config.yaml")).test
    assert abs(_accuracy(model, test) - summary["test_acc"]) <= 1e-3


def test_the_run_holds_system_metrics_from_one_monitor_per_node(switch_run):
    _, summary = switch_run
    run = MlflowClient(summary["mlflow"]["tracking_uri"]).get_run(summary["mlflow"]["run_id"])
    system = [key.split("/") for key in run.data.metrics if key.startswith("system/")]
    nodes = {node for _, node, _ in system}
    assert len(nodes) == 1  # two workers on one node: the node's first worker samples it
    assert {"cpu_utilization_percentage", "system_memory_usage_megabytes"} <= {name for *_, name in system}


def _accuracy(model: torch.nn.Module, loader) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


# What summary.json held before the worker / driver redesign (distswitch 9ac5b9e), for a launch with tracking.
PRE_REDESIGN_KEYS = {
    "model",
    "method",
    "dataset",
    "device",
    "workers",
    "selected_epoch",
    "resumed_at_epoch",
    "val_acc",
    "test_acc",
    "test_loss",
    "kept_fraction",
    "kept_units",
    "gated_units",
    "kept_per_layer",
    "dense",
    "compact",
    "export_max_abs_diff",
    "model_path",
    "widths",
    "startup_seconds",
    "startup_origin",
    "startup_timeline",
    "seconds_per_epoch",
    "images_per_s",
    "comm_bytes_per_step",
    "train_examples",
    "data_loader",
    "git_sha",
    "factor_histograms",
    "torch",
    "out_dir",
    "history",
    "config",
    "checkpoint_path",
    "mlflow",
}
SINCE = {"format"}  # summaries carry their format version since issue 38


def test_a_launch_writes_one_summary_with_the_keys_it_had_before_the_redesign(switch_run):
    out, summary = switch_run
    assert set(summary) == PRE_REDESIGN_KEYS | SINCE
    assert json.loads((out / "summary.json").read_text()) == summary  # out_dir's copy and --summary-json agree
    assert set(summary["mlflow"]) == {"tracking_uri", "run_id", "experiment"}


def test_switch_training_reports_accuracy_size_and_speed(switch_run):
    out, summary = switch_run
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] >= 0.75
    assert 0.75 <= summary["val_acc"] <= 1
    assert 0 < summary["kept_fraction"] <= 1
    for size in ("dense", "compact"):
        assert summary[size]["params"] > 0 and summary[size]["macs"] > 0
    assert summary["compact"]["params"] <= summary["dense"]["params"]
    assert summary["compact"]["macs"] <= summary["dense"]["macs"]
    assert summary["seconds_per_epoch"] > 0 and summary["images_per_s"] > 0
    assert summary["train_examples"] == 5000
    assert len(summary["history"]) == 3
    # Warm-up epochs (schedule.warmup_epochs=1) are dense; only epochs at the budget (after the
    # cut, when fine-tuning starts) can be selected, and the exported model meets the budget.
    assert summary["selected_epoch"] == 2
    assert abs(summary["compact"]["macs"] / summary["dense"]["macs"] - 0.5) <= 0.01
    assert summary["export_max_abs_diff"] <= 1e-4
    # Layers by name; the factors at exactly 0 (the units the cut removed) counted apart from the rest.
    assert list(summary["kept_per_layer"]) == list(summary["factor_histograms"]) == ["conv1", "conv2", "fc1"]
    for layer, hist in summary["factor_histograms"].items():
        row = summary["kept_per_layer"][layer]
        assert hist["zeros"] == row["units"] - row["kept"] and sum(hist["counts"]) == row["kept"], layer
    for name in ("model.pt", "model.arch.json", "config.yaml", "checkpoints/best.pt"):
        assert (out / name).is_file(), name
    # One Ray Train checkpoint per epoch and a final one; the newest `checkpoints_to_keep` (2) stay.
    ray_run = out / "ray" / out.name
    assert sorted(p.name for p in ray_run.glob("[ef]*") if p.is_dir()) == ["epoch_0002", "final"]
    assert (ray_run / "final" / "summary.json").is_file()
    assert 0 < summary["startup_seconds"] < 300


def test_saved_model_reproduces_the_reported_test_accuracy(switch_run):
    out, summary = switch_run
    cfg = load_config(out / "config.yaml")
    splits = load_splits(cfg.data)
    model = load_compact(out / "model.pt")
    assert count(model, torch.zeros(1, 1, 28, 28))["params"] == summary["compact"]["params"]
    loader = BatchLoader(splits.test, splits.info, 1000, train=False)
    assert _accuracy(model, loader) == pytest.approx(summary["test_acc"], abs=0.002)


def test_export_command_rebuilds_the_same_compact_model(switch_run, tmp_path, capsys):
    out, _ = switch_run
    exported = tmp_path / "exported.pt"
    assert main(["export", str(out / "checkpoints" / "best.pt"), "--out", str(exported)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model_path"] == str(exported)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_compact(exported)(x), load_compact(out / "model.pt")(x), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def baseline_runs(tmp_path_factory, fashion_mnist_root) -> dict[str, dict]:
    common = ["data.train_limit=3000", "train.epochs=2"]
    prune = ["budget.fraction=null", "prune.kept_fraction=0.5", "prune.finetune_epochs=1"]
    root = tmp_path_factory.mktemp("baselines")
    return {
        "dense": _train_in_process(root / "dense", *common, "method=dense"),
        "magnitude": _train_in_process(root / "magnitude", *common, *prune, "method=magnitude"),
        "slimming": _train_in_process(root / "slimming", *common, *prune, "method=slimming"),
    }


def test_dense_baseline_keeps_every_unit(baseline_runs):
    summary = baseline_runs["dense"]
    assert summary["kept_fraction"] == 1.0
    assert summary["compact"]["params"] == summary["dense"]["params"]
    assert summary["test_acc"] > 0.5


def test_magnitude_baseline_keeps_half_the_units_and_is_smaller(baseline_runs):
    summary = baseline_runs["magnitude"]
    # lenet5 gates 20 + 50 + 500 units; half of each layer stays: 10 + 25 + 250 = 285 of 570.
    assert summary["kept_units"] == 285 and summary["gated_units"] == 570
    assert summary["compact"]["params"] < summary["dense"]["params"]
    assert summary["compact"]["params"] < baseline_runs["dense"]["compact"]["params"]
    assert summary["selected_epoch"] == 1  # only the pruned (fine-tuned) epoch is a result
    assert summary["test_acc"] > 0.5


def test_slimming_baseline_prunes_to_about_half_and_is_smaller(baseline_runs):
    summary = baseline_runs["slimming"]
    assert 285 <= summary["kept_units"] <= 287  # global threshold, at least one unit per layer
    assert summary["compact"]["params"] < summary["dense"]["params"]
    assert summary["test_acc"] > 0.5


def test_training_on_betons_lands_in_the_torch_paths_accuracy_band(baseline_runs, tmp_path):
    # baseline_runs["dense"] read .beton files (the default loader); the same run on the torch path.
    # Both loaders give the same batches in the same order, so the runs stay within a small band.
    assert baseline_runs["dense"]["data_loader"] == "ffcv"
    torch_run = _train_in_process(
        tmp_path / "dense_torch", "data.train_limit=3000", "train.epochs=2", "method=dense", "data.loader=torch"
    )
    assert torch_run["data_loader"] == "torch"
    assert abs(torch_run["test_acc"] - baseline_runs["dense"]["test_acc"]) <= 0.005
    assert abs(torch_run["val_acc"] - baseline_runs["dense"]["val_acc"]) <= 0.005
