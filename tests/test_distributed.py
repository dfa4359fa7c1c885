"""Ray Train DDP with real CPU workers (gloo): both phases synchronised, 2 x b equals 1 x 2b, a worker
and then the driver killed mid-epoch resume to the same parameters, a diverging run stops once,
and resource / out_dir checks at launch.

Each run is a real `distswitch train` in a subprocess that starts its own local Ray cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT
from distswitch.config import load_config
from distswitch.driver.launch import local_paths
from distswitch.worker import Session, train

pytestmark = pytest.mark.slow

# LeNet5 has no BatchNorm, so 2 workers x 32 must give the same updates as 1 worker x 64. One TNN
# step then one SNN step (update_ratio 1), from the first epoch on: both phases every other step.
CONFIG = """\
model: {name: lenet5, gated: all}
method: switch
switcher: {arch: rowwise, width: 16, l1: 0.5}
schedule: {update_ratio: 1, warmup_epochs: 0, finetune_epochs: 0}
train: {epochs: 3, batch_size: 64, seed: 0, device: cpu, progress: false}
optim:
  tnn: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4, scheduler: cosine}
  snn: {name: adam, lr: 1.0e-3, momentum: 0.0, weight_decay: 0.0, scheduler: cosine}
data: {dataset: fashion-mnist, train_limit: 6400}
distributed: {num_workers: 2, max_failures: 1}
"""


def _command(config: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "distswitch.cli", "train", str(config), f"out_dir={out}", *overrides]


def _run(config: Path, out: Path, *overrides: str) -> dict:
    proc = subprocess.run(_command(config, out, *overrides), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _final_state(out: Path) -> dict:
    """The engine state (both networks, both optimisers) after the last epoch (of a Ray run, or of
    an in-process one)."""
    summary = json.loads((out / "summary.json").read_text())
    last = max([*(out / "ray" / out.name).glob("epoch_*"), *(out / "checkpoints").glob("epoch_*")])
    state = torch.load(last / "state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == len(summary["history"]) - 1
    return state["engine"]


def _tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            flat[prefix + str(key)] = value
        elif isinstance(value, dict):
            flat.update(_tensors(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            flat.update(_tensors(dict(enumerate(value)), f"{prefix}{key}."))
    return flat


@pytest.fixture(scope="module")
def config(tmp_path_factory, fashion_mnist_root) -> Path:
    path = tmp_path_factory.mktemp("config") / "ddp.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def two_workers(config, tmp_path_factory, tracking_server) -> Path:
    """The uninterrupted 2-worker run, logged to the team's tracking server (`make tracking-server`)."""
    out = tmp_path_factory.mktemp("two") / "two"
    _run(config, out, f"tracking.uri={tracking_server}", f"tracking.experiment=ddp-{uuid.uuid4().hex[:8]}")
    return out


def test_a_two_worker_run_logs_through_the_tracking_server_and_runs_and_compare_read_it(
    two_workers, tracking_server, tmp_path, capsys
):
    from distswitch.cli import main

    summary = json.loads((two_workers / "summary.json").read_text())
    assert summary["mlflow"]["tracking_uri"] == tracking_server
    client = MlflowClient(tracking_server)
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0, 1, 2]
    assert any(key.startswith("system/") for key in run.data.metrics)  # the node's system metrics
    # The compact model comes back through the server (no disk shared with the workers).
    arch = client.download_artifacts(run.info.run_id, "model.arch.json", str(tmp_path))
    assert json.loads(Path(arch).read_text()) == json.loads((two_workers / "model.arch.json").read_text())
    experiment = summary["mlflow"]["experiment"]
    capsys.readouterr()
    assert main(["runs", "--uri", tracking_server, "--experiment", experiment]) == 0
    assert run.info.run_name in capsys.readouterr().out
    assert (
        main(["compare", "--uri", tracking_server, "--experiment", experiment, "--out", str(tmp_path / "c.png")]) == 0
    )
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_replicas_stay_identical_through_both_phases(two_workers):
    summary = json.loads((two_workers / "summary.json").read_text())
    assert summary["workers"] == 2
    for epoch in summary["history"]:
        assert epoch["steps"]["tnn"] > 0 and epoch["steps"]["snn"] > 0
        digests = epoch["replica_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], epoch["epoch"]


def test_each_phase_all_reduces_only_its_own_gradients(two_workers):
    summary = json.loads((two_workers / "summary.json").read_text())
    state = _final_state(two_workers)
    tnn_bytes = sum(t.numel() * t.element_size() for t in state["tnn"].values() if t.is_floating_point())
    snn_bytes = sum(t.numel() * t.element_size() for t in state["source"].values())
    comm = summary["comm_bytes_per_step"]
    assert comm["tnn"] == tnn_bytes  # every TNN gradient once per TNN step
    assert comm["snn"] == snn_bytes  # only the switcher's in an SNN step
    assert comm["snn"] < 0.05 * comm["tnn"]


def test_two_workers_update_like_one_worker_with_the_whole_batch(config, tmp_path):
    # 10 steps (5 TNN, 5 SNN): long runs drift apart by float rounding (sums in another order)
    # amplified over hundreds of steps, which says nothing about the updates themselves.
    short = ["train.epochs=1", "data.train_limit=640"]
    # The whole batch in one process, here (the same `run.train` a Ray worker runs, without Ray).
    train(
        load_config(config, [f"out_dir={tmp_path / 'one'}", *short, "distributed.num_workers=1"]),
        Session(tmp_path / "one"),
    )
    _run(config, tmp_path / "two", *short, "distributed.num_workers=2")
    a, b = _tensors(_final_state(tmp_path / "one")), _tensors(_final_state(tmp_path / "two"))
    assert a.keys() == b.keys()
    assert any(k.startswith("source.") for k in a) and any(k.startswith("optimizers.snn") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_worker_leaves_no_scratch_files_whether_it_finishes_or_stops(config, tmp_path, monkeypatch):
    import tempfile

    from distswitch.stop import TrainingStopped

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the worker's mkdtemp goes
    # torch's compiler cache (torch.export of the compact model) would go there too on its first use
    # in this process, i.e. when this test runs alone: it is torch's, kept elsewhere.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    short = ["train.epochs=2", "data.train_limit=640", "distributed.num_workers=1"]
    train(load_config(config, [f"out_dir={tmp_path / 'done'}", *short]), Session(tmp_path / "done"))
    assert list(scratch.iterdir()) == []
    with pytest.raises(TrainingStopped):
        train(
            load_config(config, [f"out_dir={tmp_path / 'stop'}", *short, "optim.tnn.lr=1e30"]),
            Session(tmp_path / "stop"),
        )
    assert list(scratch.iterdir()) == []
    assert (tmp_path / "stop" / "checkpoints").is_dir()  # the stop was reported before the cleanup


def _train_workers() -> list[psutil.Process]:
    """Ray Train's worker processes on this machine (Ray titles them ray::RayTrainWorker...)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::RayTrainWorker"):
            found.append(proc)
    return found


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the checkpoint folder `path` is registered by Ray Train, not only written: a restart or a
    relaunch resumes from the last registered one, and on a loaded machine registration lags the
    folder by seconds (a kill in between resumed an epoch earlier, seen once in a loaded run). Ray
    Train V2 rewrites <run_dir>/checkpoint_manager_snapshot.json at each registration."""
    deadline = time.time() + timeout
    snapshot = path.parent / "checkpoint_manager_snapshot.json"
    while not (path.is_dir() and snapshot.is_file() and f'"{path.name}"' in snapshot.read_text()):
        assert proc.poll() is None and time.time() < deadline, f"the run ended (or stalled) before {path.name}"
        time.sleep(0.1)


def test_a_worker_then_the_driver_killed_mid_epoch_and_the_newest_checkpoint_cut_resume_to_the_uninterrupted_parameters(
    config, two_workers, tmp_path
):
    """Three faults in one run. A worker SIGKILLed in epoch 2: Ray Train restarts the group from
    epoch 1's checkpoint (max_failures 1). Then the driver SIGKILLed in epoch 3, its local cluster
    going with it, and epoch 2's checkpoint cut short (a full disk, a node lost mid-write); the same
    command run again names it, and continues from epoch 1's. The end is bit-identical to an
    uninterrupted run, in one MLflow run with each epoch logged once."""
    out = tmp_path / "killed"
    run_dir = out / "ray" / out.name
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(_command(config, out), cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT)
        try:
            _wait_for(run_dir / "epoch_0000", proc)  # epoch 1 is checkpointed: epoch 2 is running
            time.sleep(0.5)
            workers = _train_workers()
            assert len(workers) == 2
            assert not (run_dir / "epoch_0001").exists(), "the worker kill must land inside epoch 2"
            os.kill(workers[-1].pid, signal.SIGKILL)
            _wait_for(run_dir / "epoch_0001", proc)  # the restarted group finished epoch 2
            assert not (run_dir / "epoch_0002").exists(), "the driver kill must land inside epoch 3"
            proc.send_signal(signal.SIGKILL)  # the driver only: its local Ray cluster must go with it
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "resuming from" in log.read_text()  # the worker group's restart
    deadline = time.time() + 60
    while _train_workers():  # Ray's processes share the driver's fate
        assert time.time() < deadline, "Ray Train workers outlived their driver by 60 s"
        time.sleep(0.5)
    newest = run_dir / "epoch_0001" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    again = subprocess.run(_command(config, out), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"the checkpoint {run_dir / 'epoch_0001'} is damaged: state.pt holds 1000 bytes" in again.stderr
    a = json.loads((out / "summary.json").read_text())
    b = json.loads((two_workers / "summary.json").read_text())
    assert a["resumed_at_epoch"] == 1 and b["resumed_at_epoch"] == 0  # the rerun continued after epoch 1
    resumed, uninterrupted = _tensors(_final_state(out)), _tensors(_final_state(two_workers))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert [h["val_acc"] for h in a["history"]] == [h["val_acc"] for h in b["history"]]
    assert a["test_acc"] == b["test_acc"]
    # The killed driver's MLflow run is the one continued: FINISHED, every epoch logged once.
    client = MlflowClient(a["mlflow"]["tracking_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [a["mlflow"]["run_id"]] and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["distswitch.relaunches"] == "1"
    history = client.get_metric_history(runs[0].info.run_id, "val/acc")
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == [h["val_acc"] for h in a["history"]]


def test_sigterm_to_the_driver_s_process_group_ends_the_run_killed_and_the_same_command_resumes(
    config, two_workers, tmp_path, mlflow_store
):
    """What `kill`, Kubernetes and SLURM send: SIGTERM to the launcher's process group, inside epoch 2
    (after a second launch on the same out_dir was refused). One line, exit 128 + 15, no traceback,
    the MLflow run KILLED with the signal named; the same command then continues from the newest
    checkpoint to the uninterrupted run's parameters, one value per epoch in the one MLflow run."""
    out = tmp_path / "terminated"
    run_dir = out / "ray" / out.name
    logs = {name: (tmp_path / f"{name}.log").open("w+") for name in ("stdout", "stderr")}
    proc = subprocess.Popen(
        _command(config, out), cwd=REPO_ROOT, stdout=logs["stdout"], stderr=logs["stderr"], start_new_session=True
    )  # its own group, as a shell or scheduler starts it
    try:
        deadline = time.time() + 120
        while f'"pid": {proc.pid},' not in _read(out / ".distswitch.lock"):  # the first driver holds its claim
            assert proc.poll() is None and time.time() < deadline, "the first launch never claimed its out_dir"
            time.sleep(0.1)
        # A second launch on the same out_dir, meanwhile: refused before Ray starts, naming the first.
        second = subprocess.run(_command(config, out), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr[-3000:]
        assert "in use by another distswitch run (host" in second.stderr and f"pid {proc.pid}," in second.stderr
        _wait_for(run_dir / "epoch_0000", proc)
        assert not (run_dir / "epoch_0001").exists(), "the signal must land inside epoch 2"
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for sink in logs.values():
            sink.close()
    stdout, stderr = (tmp_path / "stdout.log").read_text(), (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM; run the same command again" in stderr
    assert "Traceback" not in stdout + stderr, (stdout + stderr)[-3000:]
    client = MlflowClient(mlflow_store)
    [killed] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert killed.info.status == "KILLED" and killed.data.tags["distswitch.signal"] == "SIGTERM"
    again = subprocess.run(_command(config, out), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    a = json.loads((out / "summary.json").read_text())
    # The newest complete checkpoint: epoch 2's may still land while the workers are being stopped,
    # but not epoch 3's (the workers once trained on for two epochs while Ray shut down).
    assert a["resumed_at_epoch"] in (1, 2)
    resumed, uninterrupted = _tensors(_final_state(out)), _tensors(_final_state(two_workers))
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    run = client.get_run(a["mlflow"]["run_id"])
    assert run.info.run_id == killed.info.run_id  # the killed run is the one continued
    assert run.info.status == "FINISHED" and run.data.tags["distswitch.relaunches"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0, 1, 2]


def test_ctrl_c_ends_the_run_as_sigterm_does_and_the_workers_stop_at_once(config, tmp_path, mlflow_store):
    """SIGINT (Ctrl-C in a terminal) inside epoch 2 of 3: the workers stop within the epoch (no
    epoch 3 checkpoint), one line, exit 128 + 2, no traceback, the MLflow run KILLED, SIGINT named.
    (Ray Train's own Ctrl-C handler exited 1 after a ~9 s abort, the workers training on.)"""
    out = tmp_path / "interrupted"
    run_dir = out / "ray" / out.name
    with (tmp_path / "stderr.log").open("w+") as sink:
        proc = subprocess.Popen(
            _command(config, out), cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_for(run_dir / "epoch_0000", proc)
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 128 + signal.SIGINT, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("distswitch: stopped by SIGINT; run the same command again")
    assert "Traceback" not in output and "unexpected system error" not in output, output[-3000:]
    assert not (run_dir / "epoch_0002").exists(), "the workers trained on after the signal"
    client = MlflowClient(mlflow_store)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED" and run.data.tags["distswitch.signal"] == "SIGINT"


def test_more_workers_than_local_cpus_is_refused_before_training(config, tmp_path):
    proc = subprocess.run(
        _command(config, tmp_path / "big", "distributed.num_workers=64", "train.batch_size=128"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("distswitch: error: distributed: 64 workers need 64 CPU"), last
    assert not (tmp_path / "big" / "summary.json").exists()


def test_finished_out_dir_is_not_overwritten(config, two_workers):
    before = (two_workers / "summary.json").read_bytes()
    proc = subprocess.run(_command(config, two_workers), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "already holds a finished run" in proc.stderr
    assert (two_workers / "summary.json").read_bytes() == before


def test_a_diverging_run_stops_once_in_one_line_keeps_its_last_good_checkpoint_and_resumes_when_fixed(config, tmp_path):
    # Epoch 1 is a dense warm-up (finite); in epoch 2 the first SNN step (Adam, lr 1e30) sends the
    # switcher's factors to inf. max_failures=1: a stop must not be retried into the same divergence.
    out = tmp_path / "nan"
    short = ["train.epochs=2", "schedule.warmup_epochs=1", "data.train_limit=1280"]
    proc = subprocess.run(
        _command(config, out, *short, "optim.snn.lr=1e30"), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(
        r"distswitch: stopped: training diverged: the (loss is|switcher's factors are) not finite at "
        r"step \d+ of epoch 2 \((TNN|SNN) phase, worker \d\)",
        last,
    ), last
    # No distswitch frame in the output (Ray's controller may log its own), and one attempt, no retry.
    assert not re.search(r'File ".*/distswitch/', proc.stderr) and "resuming from" not in proc.stderr
    run_dir = out / "ray" / out.name
    [stopped] = run_dir.glob("stopped_*")
    assert str(stopped) in last and (stopped / "stopped.json").is_file()
    good = torch.load(run_dir / "epoch_0000" / "state.pt", map_location="cpu", weights_only=True)
    kept = torch.load(stopped / "state.pt", map_location="cpu", weights_only=True)
    assert good["epoch"] == kept["epoch"] == 0  # the last good epoch, nothing of the diverged one
    assert all(torch.isfinite(t).all() for t in _tensors(kept["engine"]).values() if t.is_floating_point())
    assert not (out / "summary.json").exists()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # this test's store (conftest)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and "training diverged" in run.data.tags["distswitch.error"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0]
    # The same command with a sane learning rate continues from the kept epoch, in the same run.
    again = subprocess.run(_command(config, out, *short), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the last attempt stopped: training diverged" in again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_at_epoch"] == 1 and summary["mlflow"]["run_id"] == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0, 1]


def test_a_checkpoint_of_two_workers_resumes_on_one_and_says_how_it_was_resharded(
    two_workers, config, tmp_path, capsys
):
    # An elastic group that shrank, or a relaunch with fewer resources: the same global batches in the
    # same order, each worker's generators re-seeded (its saved ones belong to another split).
    newest = sorted((two_workers / "ray" / two_workers.name).glob("epoch_*"))[-1]
    out = tmp_path / "one"
    shutil.copytree(newest, out / "checkpoints" / newest.name)
    epoch = int(newest.name.split("_")[1])
    # One epoch more than the two workers ran: the resumed worker trains it.
    cfg = load_config(
        config, [f"out_dir={out}", "distributed.num_workers=1", "tracking.enabled=false", "train.epochs=4"]
    )
    summary = train(local_paths(cfg), Session(out))  # the data paths as the launcher made them
    err = capsys.readouterr().err
    assert (
        "resuming on 1 worker a checkpoint of 2: the same global batches of 64 in the same order, now split 64; "
        "each worker's random generators re-seeded"
    ) in err
    assert summary["resumed_at_epoch"] == epoch + 1 and len(summary["history"]) == 4 and summary["workers"] == 1
