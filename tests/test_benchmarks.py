"""The benchmarks keep running: reduced forms in CI (no timing asserts; the figures are in
docs/results.md from full runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from distswitch.config import load_config

pytestmark = pytest.mark.slow


def _bench(script: str, out, *args: str) -> tuple[dict, str]:
    """Run benchmarks/<script> in a fresh interpreter; (its JSON report, its stdout)."""
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args, "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def test_data_loading_benchmark_reports_every_loader_and_the_ratio(tmp_path):
    report, stdout = _bench("data_loading.py", tmp_path / "data_loading.json", "--limit", "3072", "--epochs", "2")
    assert set(report["results"]) == {"ffcv", "dataloader", "distswitch-torch"}
    assert all(len(r["images_per_s"]) == 2 and min(r["images_per_s"]) > 0 for r in report["results"].values())
    assert report["ratio_ffcv_vs_dataloader"] > 0 and "FFCV / DataLoader" in stdout


def test_switcher_overhead_benchmark_times_dense_eager_and_compiled_switch_side_by_side(tmp_path):
    report, _ = _bench("switcher_overhead.py", tmp_path / "overhead.json", "--rounds", "1", "--train-limit", "1024")
    steps = report["steps_per_epoch"]
    assert steps["dense"]["snn"] == 0 and steps["switch"]["snn"] > 0 and steps["switch_compiled"] == steps["switch"]
    assert all(len(v) == 1 and v[0] > 0 for v in report["seconds_per_epoch"].values())
    assert report["switch_over_dense"] > 0 and report["switch_compiled_over_dense"] > 0


def test_startup_benchmark_s_short_run_is_a_config_distswitch_accepts():
    # The benchmark itself is two Ray start-ups (about 80 s): too long for CI, whose Ray tests cover
    # the start. Its short run failed unseen once budgets needed fine-tuning epochs: checked here.
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import startup

    cfg = load_config(
        REPO_ROOT / "configs/fashion_lenet5.yaml", [*startup.SHORT, "distributed.num_workers=2", "data.loader=ffcv"]
    )
    assert cfg.train.epochs == 1 and cfg.budget.fraction is None


def test_reference_benchmark_alternates_whole_epochs_and_reports_per_step_against_the_reference(tmp_path):
    report, _ = _bench("reference_mlp.py", tmp_path / "reference.json", "--epochs", "2", "data.train_limit=640")
    assert [r["phase"] for r in report["epochs"]] == ["tnn", "snn"]  # the papers' whole-epoch alternation
    assert all(r["steps"] == 10 for r in report["epochs"])  # 640 images at batch 64
    assert report["batch_size"] == 64 and report["switcher"] == "rowwise"
    assert report["faster_than_reference_per_step"] > 0
    assert report["faster_than_reference_per_epoch"] is None  # not a full epoch: no per-epoch claim
    assert 0 <= report["test_acc_after_2_epochs"] <= 1


def test_time_to_accuracy_stops_each_method_at_the_first_epoch_reaching_the_target(tmp_path):
    report, _ = _bench(
        "time_to_accuracy.py",
        tmp_path / "tta.json",
        "--target",
        "0.5",
        "train.epochs=3",
        "schedule.finetune_epochs=1",
        "data.train_limit=1024",
    )
    for method in ("dense", "switch"):
        rows, hit = report["epochs"][method], report["reached"][method]
        assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(a["train_s"] < b["train_s"] for a, b in zip(rows, rows[1:]))
        assert all(r["test_acc"] < 0.5 for r in rows[:-1])
        if hit is None:
            assert len(rows) == 3 and rows[-1]["test_acc"] < 0.5
        else:
            assert hit == rows[-1] and hit["test_acc"] >= 0.5


def test_communication_benchmark_counts_each_phase_s_own_parameter_bytes(tmp_path):
    report, stdout = _bench("communication.py", tmp_path / "comm.json", "--model", "lenet5")
    assert len(report["settings"]) == 3 and "SNN/TNN" in stdout
    for row in report["settings"]:
        assert row["bytes_per_step"] == {"tnn": 4 * row["parameters"]["tnn"], "snn": 4 * row["parameters"]["snn"]}


def test_scale_benchmark_times_the_three_steps_and_counts_the_switcher_s_inputs_and_bytes(tmp_path):
    report, _ = _bench(
        "scale.py",
        tmp_path / "scale.json",
        "--models",
        "lenet5",
        "resnet20",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--batch",
        "4",
    )
    for row in report["models"].values():
        assert set(row["median_ms"]) == {
            "dense step",
            "switch TNN step",
            "switch SNN step",
            "switcher forward (no grad)",
        }
        assert row["switch_over_dense_per_training_step"] > 0 and row["peak_mb"]["switch"] > 0
        assert row["allreduce_bytes_per_step"] == {
            "tnn": 4 * row["tnn_parameters"],
            "snn": 4 * row["switcher_parameters"],
        }
    assert report["models"]["resnet20"]["groups"] == 12  # 9 blocks' inner channels and the 3 stages' streams


def test_preflight_benchmark_builds_each_model_in_a_fresh_process(tmp_path):
    report, _ = _bench("preflight.py", tmp_path / "preflight.json", "--models", "resnet20", "--rounds", "1")
    row = report["models"]["resnet20"]
    assert row["groups"] == 12 and row["coupled_groups"] == 3 and len(row["seconds"]) == 1


def test_gpu_throughput_benchmark_counts_model_flops_and_times_both_methods(tmp_path):
    # Reduced (LeNet5, few steps) on whatever device this host has; a peak above any device's
    # (H200: 989 TFLOP/s bf16), so MFU < 1 holds on a GPU host too.
    report, _ = _bench(
        "gpu_throughput.py",
        tmp_path / "gpu.json",
        "--model",
        "lenet5",
        "--batch",
        "32",
        "--steps",
        "5",
        "--warmup",
        "2",
        "--precision",
        "fp32",
        "--compile",
        "none",
        "--peak-tflops",
        "10000",
    )
    # LeNet5 at 3x32x32: 4.3 M multiply-adds forward (8.6 MFLOP) per image; a training step is 2-3x
    # the forward (no input gradient for the first conv), so 32 images make 5.5e8 to 8.3e8.
    assert 5e8 < report["model_flops_per_step"] < 9e8
    assert set(report["variants"]) == {"dense", "switch"}
    assert all(v["images_per_s"] > 0 and 0 < v["mfu"] < 1 for v in report["variants"].values())
    for v in report["variants"].values():  # MFU = model FLOP/s over the peak
        flops_per_s = report["model_flops_per_step"] / (v["ms_per_step"] / 1e3)
        assert v["mfu"] == pytest.approx(flops_per_s / 10000e12, rel=0.01)


# What the device machine lacks: gpu_check must run without them, lazily imported ones included.
NOT_ON_THE_DEVICE = ("ray", "ffcv", "mlflow", "tqdm", "numba", "matplotlib")
# A None in sys.modules makes `import name` raise ImportError and find_spec answer None: as if the
# package were not installed.
_BLOCKED_RUN = f"""
import runpy, sys
sys.modules.update(dict.fromkeys({NOT_ON_THE_DEVICE!r}))
sys.argv = ["benchmarks/gpu_check.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


def test_gpu_check_trains_exports_and_resumes_each_case_without_ray_ffcv_or_mlflow(tmp_path):
    # The device run's script on CPU, tiny: LeNet5 in fp32 and bf16, eager.
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _BLOCKED_RUN,
            "--device",
            "cpu",
            "--models",
            "lenet5",
            "--precisions",
            "fp32",
            "bf16",
            "--compile",
            "none",
            "--steps",
            "5",
            "--warmup",
            "2",
            "--batch",
            "8",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(c["model"], c["precision"], c["compile"]) for c in report["cases"]] == [
        ("lenet5", "fp32", "none"),
        ("lenet5", "bf16", "none"),
    ]
    for case in report["cases"]:
        assert case["ok"] and case["steps"]["tnn"] + case["steps"]["snn"] == 5 and case["steps"]["snn"] >= 1
        assert case["images_per_s"] > 0 and 0 < case["mfu"] < 1 and case["export_max_abs_diff"] <= 1e-4
        assert case["resume"] == {**case["resume"], "same_digest": True, "rng_restored": True}
    table = proc.stdout.splitlines()
    assert table[0].split()[:3] == ["model", "prec", "compile"] and sum("PASS" in line for line in table) == 2


def test_gpu_check_exits_non_zero_when_a_case_fails(tmp_path):
    # A model name no registry knows fails its case; the table still prints and the exit status says so.
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_check.py",
            "--device",
            "cpu",
            "--models",
            "lenet5",
            "nonet",
            "--precisions",
            "fp32",
            "--compile",
            "none",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch",
            "4",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("lenet5", "nonet"))]
    assert "PASS" in rows[0] and "FAIL UnknownNameError" in rows[1], proc.stdout


def test_pareto_benchmark_runs_its_grid_as_sweeps_meets_each_budget_and_resumes_without_rerunning(tmp_path):
    out = tmp_path / "pareto"
    args = [
        sys.executable,
        "benchmarks/pareto.py",
        "--out",
        str(out),
        "--quick",
        "--models",
        "mlp",
        "--budgets",
        "0.5",
        "0.15",
        "--methods",
        "dense",
        "switch",
        "magnitude",
    ]
    proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "pareto.json").read_text())
    rows = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert set(rows) == {("dense", None)} | {(m, b) for m in ("switch", "magnitude") for b in (0.5, 0.15)}
    for (method, budget), row in rows.items():
        if budget is not None:
            assert row["budget_error"] <= 0.01, (method, budget, row["macs"])
            assert ("mcnemar" in row) == (method != "magnitude")  # each method against the reference
    assert (out / "pareto.png").stat().st_size > 10_000
    assert "| mlp | 15% | switch |" in (out / "pareto.md").read_text()
    # One sweep for the dense run, one for the rest (the same budgets); every run a trial of it.
    assert proc.stdout.count("[pareto] sweep ") == 4 and len(list(out.glob("sweeps/*/trials/*/summary.json"))) == 5
    again = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "[pareto] sweep " not in again.stdout  # nothing run again
    assert json.loads((out / "pareto.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))


def _pareto():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import pareto
    finally:
        sys.path.pop(0)
    return pareto


def test_the_paired_t_test_gives_the_textbook_one_sided_p():
    # diffs 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.464 with 2 df; P(T > 3.464) = 0.0371.
    t = _pareto().paired_t([0.01, 0.02, 0.03])
    assert t["t"] == pytest.approx(3.4641, abs=1e-4)
    assert t["better"] == pytest.approx(0.03709, abs=1e-4) and t["worse"] == pytest.approx(1 - 0.03709, abs=1e-4)


def test_holm_multiplies_the_smallest_p_by_the_cell_count_and_keeps_the_adjusted_order():
    rows = [{"method": "switch", "paired_t": {"better": p, "worse": 1 - p}} for p in (0.04, 0.01, 0.03)]
    rows.append({"method": "magnitude", "paired_t": {"better": 0.02, "worse": 0.98}})
    _pareto().holm(rows)
    assert [r["paired_t"]["better_holm"] for r in rows] == pytest.approx([0.06, 0.03, 0.06, 0.02])


def test_mcnemar_s_exact_p_counts_only_the_discordant_pairs():
    import torch

    # 10 right only by a, 2 only by b, 88 by both or neither: p = 2 * (C(12,0)+C(12,1)+C(12,2)) / 2^12.
    a = torch.tensor([True] * 10 + [False] * 2 + [True] * 50 + [False] * 38)
    b = torch.tensor([False] * 10 + [True] * 2 + [True] * 50 + [False] * 38)
    assert _pareto().mcnemar(a, b) == (10, 2, pytest.approx(158 / 4096))
    assert _pareto().mcnemar(a, a) == (0, 0, 1.0)
