"""`distswitch compare` over a real MLflow store: settings told apart by what differs, seeds
aggregated, unfinished runs left out, the figure written and logged to one comparison run."""

from __future__ import annotations

import statistics

from mlflow.tracking import MlflowClient

from conftest import make_config
from distswitch.cli import main
from distswitch.compare import COMPARE_TAG
from distswitch.delivery import log_metrics
from distswitch.tracking import BEST, open_run

DENSE = {"dense/macs": 2_000_000, "dense/params": 400_000}


def _run(tmp_path, name: str, acc: float, macs: float, finished: bool = True, **sections) -> str:
    sections.setdefault("schedule", {"finetune_epochs": 1})  # a budget's cut needs one
    cfg = make_config(out_dir=str(tmp_path / name), tracking={"experiment": "lenet"}, **sections)
    uri, run_id = open_run(cfg, name)
    log_metrics(uri, run_id, {BEST["test_acc"]: acc, BEST["macs"]: macs, BEST["params"]: macs / 5, **DENSE}, step=3)
    if finished:
        MlflowClient(uri).set_terminated(run_id, "FINISHED")
    return uri


def test_compare_aggregates_seeds_per_setting_and_logs_its_figure(tmp_path, capsys):
    budget = {"kind": "macs", "fraction": 0.5}
    uri = _run(tmp_path, "dense", 0.91, 2_000_000, method="dense")
    for seed, acc in ((0, 0.90), (1, 0.88)):
        _run(tmp_path, f"switch-s{seed}", acc, 1_000_000, method="switch", budget=budget, train={"seed": seed})
    _run(tmp_path, "incoming", 0.87, 1_000_000, method="switch", budget=budget, switcher={"describe": "incoming"})
    _run(tmp_path, "magnitude", 0.89, 990_000, method="magnitude", budget=budget)
    _run(tmp_path, "unfinished", 0.10, 1_000_000, finished=False, method="magnitude", budget=budget)

    figure = tmp_path / "trade-off.png"
    assert main(["compare", "--experiment", "lenet", "--out", str(figure)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split("|")[3].strip(): line for line in lines[2:-1]}
    assert set(rows) == {"dense", "switch (switcher.describe=both)", "switch (switcher.describe=incoming)", "magnitude"}
    mean, std = statistics.fmean([0.90, 0.88]), statistics.stdev([0.90, 0.88])
    assert f"{mean:.4f} ± {std:.4f}" in rows["switch (switcher.describe=both)"]
    assert "1,000,000 (0.500)" in rows["switch (switcher.describe=both)"] and rows[
        "switch (switcher.describe=both)"
    ].endswith("| 2 |")
    assert "0.8900 ± 0.0000" in rows["magnitude"] and rows["magnitude"].endswith("| 1 |")  # the unfinished one left out
    assert figure.stat().st_size > 10_000 and lines[-1].startswith(f"figure: {figure}")

    client = MlflowClient(uri)
    [compare] = client.search_runs(
        [client.get_experiment_by_name("lenet").experiment_id], filter_string=f"tags.`{COMPARE_TAG}` = '1'"
    )
    assert {a.path for a in client.list_artifacts(compare.info.run_id, "compare")} == {
        "compare/trade-off.png",
        "compare/table.md",
    }
    assert main(["compare", "--experiment", "lenet", "--out", str(figure)]) == 0  # again: the same run, updated
    assert len(client.search_runs([compare.info.experiment_id], filter_string=f"tags.`{COMPARE_TAG}` = '1'")) == 1


def test_compare_without_finished_runs_says_so_in_one_line(tmp_path, capsys):
    _run(tmp_path, "unfinished", 0.5, 1.0, finished=False)
    assert main(["compare", "--out", str(tmp_path / "x.png")]) == 2
    assert "no finished training runs" in capsys.readouterr().err
