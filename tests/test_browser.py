"""The MLflow UI over a real store, in a real browser (Debian's headless Chromium driven by
selenium): three short real runs (dense, switch, magnitude) logged as `distswitch train` logs
them, `distswitch compare` over them, then the experiment page, a run's page, its figures and the
compare view as a person sees them."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import DEFAULT_CONFIG, REPO_ROOT
from distswitch.cli import main
from distswitch.config import load_config
from distswitch.delivery import EpochLogger
from distswitch.driver.run import RunHandle
from distswitch.summary import Summary
from distswitch.worker import train

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from mlflow_screenshot import chromium, compare_view, serve, wait_for_text  # noqa: E402

pytestmark = pytest.mark.slow

SHORT = ["train.progress=false", "train.device=cpu", "data.train_limit=1000", "train.epochs=2", "data.loader=torch"]
METHODS = {"dense": ["method=dense"], "switch": ["method=switch"], "magnitude": ["method=magnitude"]}


def _tracked_run(out: Path, overrides: list[str]) -> str:
    """What `distswitch train` does around the worker (open the run, log each epoch, finish with the
    artifacts and the model), in this process: the same code without a cluster's start-up."""
    cfg = load_config(DEFAULT_CONFIG, [*SHORT, *overrides, f"out_dir={out}"])
    handle = RunHandle.open(cfg, str(out / "ray"), out.name)
    tracker = EpochLogger(*handle.tracking)
    summary = train(cfg, tracker=tracker)
    tracker.close(timeout=60)
    handle.finish(Summary.from_dict(summary))
    return handle.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory, fashion_mnist_root):
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the module's store (conftest's is per test)
    try:
        runs = {name: _tracked_run(folder / name, extra) for name, extra in METHODS.items()}
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
    return folder, uri, runs


@pytest.fixture(scope="module")
def ui(store):
    with serve(store[0]) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def _page(browser, url: str, *texts: str) -> str:
    browser.get(url)
    return wait_for_text(browser, *texts)


def _click(browser, text: str, *then: str, timeout: float = 30) -> None:
    """Click the element showing `text`, then wait for every one of `then` to show."""
    browser.find_element("xpath", f"//*[normalize-space(text())='{text}']").click()
    deadline = time.time() + timeout
    while not all(t in browser.find_element("tag name", "body").text for t in then):
        assert time.time() < deadline, f"after clicking {text!r}: missing {then}"
        time.sleep(0.5)


def test_compare_over_the_store_gives_one_row_per_method(store, tmp_path, capsys):
    folder, uri, _ = store
    assert main(["compare", "--uri", uri, "--out", str(tmp_path / "compare.png")]) == 0
    rows = [line.split("|")[3].strip() for line in capsys.readouterr().out.splitlines()[2:] if line.startswith("|")]
    assert sorted(rows) == ["dense", "magnitude", "switch"]


def test_the_experiment_page_shows_every_run_with_its_dataset(store, ui, browser):
    _, uri, runs = store
    experiment = MlflowClient(uri).get_run(runs["switch"]).info.experiment_id
    body = _page(browser, f"{ui}/#/experiments/{experiment}/runs", *METHODS, "fashion-mnist")
    assert "Training runs" in body  # the experiment opens on its training runs


def test_a_run_page_shows_test_accuracy_kept_fraction_and_the_figures(store, ui, browser):
    _, uri, runs = store
    run = MlflowClient(uri).get_run(runs["switch"])
    base = f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    body = _page(browser, base, "test/acc", "kept_fraction", "best/compact_macs")
    lines = body.splitlines()
    for metric in ("test/acc", "kept_fraction"):  # the metrics table: name, then its value
        assert float(lines[lines.index(metric) + 1]) == pytest.approx(run.data.metrics[metric], abs=1e-3), metric
    _page(browser, f"{base}/artifacts", "figures", "summary.json", "model.arch.json")
    _click(browser, "figures", "kept_per_layer.png", "factor_histograms.png", "accuracy_and_kept.png")
    _click(browser, "kept_per_layer.png")
    deadline = time.time() + 30
    while not any(
        (img.get_attribute("src") or "").startswith("blob:") and img.get_property("naturalWidth") > 100
        for img in browser.find_elements("tag name", "img")
    ):  # the figure itself, not a broken link
        assert time.time() < deadline, "the figure's preview did not load"
        time.sleep(0.5)


def test_the_compare_view_of_the_three_runs_renders(store, ui, browser, tmp_path):
    _, uri, runs = store
    experiment = MlflowClient(uri).get_run(runs["switch"]).info.experiment_id
    _page(browser, compare_view(ui, experiment, list(runs.values())), "Comparing 3 Runs", "val/acc", *METHODS)
    shot = tmp_path / "compare_view.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
