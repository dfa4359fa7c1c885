"""The benchmarks keep running: reduced forms in CI (no timing asserts; the figures are in
docs/results.md from full runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _bench(script: str, out, *args: str) -> tuple[dict, str]:
    """Run benchmarks/<script> in a fresh interpreter; (its JSON report, its stdout)."""
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args, "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def test_data_loading_benchmark_reports_every_loader_and_the_ratio(tmp_path):
    report, stdout = _bench("data_loading.py", tmp_path / "data_loading.json", "--limit", "3072", "--epochs", "2")
    assert set(report["results"]) == {"ffcv", "dataloader", "distswitch-torch"}
    assert all(len(r["images_per_s"]) == 2 and min(r["images_per_s"]) > 0 for r in report["results"].values())
    assert report["ratio_ffcv_vs_dataloader"] > 0 and "FFCV / DataLoader" in stdout


def test_switcher_overhead_benchmark_times_both_methods_side_by_side(tmp_path):
    report, _ = _bench("switcher_overhead.py", tmp_path / "overhead.json", "--rounds", "1", "--train-limit", "1024")
    assert report["steps_per_epoch"]["dense"]["snn"] == 0 and report["steps_per_epoch"]["switch"]["snn"] > 0
    assert all(len(v) == 1 and v[0] > 0 for v in report["seconds_per_epoch"].values())
    assert report["switch_over_dense"] > 0
