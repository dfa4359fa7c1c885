"""A damaged checkpoint is found and skipped: each folder is sealed by a manifest written last; a
run resumes the newest intact one, naming each damaged one it passes over; with none intact it
stops in one line (exit 2) instead of retrying on the same files; names are never reused.

In-process runs (the same worker code Ray Train runs); the Ray path with a truncated newest
checkpoint is tests/test_distributed.py's kill-and-relaunch test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distswitch.checkpoint import read as read_checkpoint
from distswitch.checkpoint import verify
from distswitch.config import load_config
from distswitch.manifest import MANIFEST_FILE, CheckpointDamaged, order, seal, unused_name
from distswitch.worker import train

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "train.epochs=3",
    "schedule.warmup_epochs=1",
    "schedule.finetune_epochs=1",
    "budget.fraction=0.5",
    "data.train_limit=512",
    "data.val_size=128",
    "data.loader=torch",
    "tracking.enabled=false",
    "train.progress=false",
    "distributed.num_workers=1",
    "distributed.checkpoint_every=1",
    "train.batch_size=64",
]


def _cfg(out: Path):
    return load_config(ROOT / "configs/fashion_mlp.yaml", [*SHORT, f"out_dir={out}"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted in-process run: a checkpoint folder per epoch under out/checkpoints."""
    out = tmp_path_factory.mktemp("integrity") / "straight"
    train(_cfg(out))
    return out


def _sealed(folder: Path) -> Path:
    folder.mkdir(parents=True)
    torch.save({"x": torch.arange(1000)}, folder / "state.pt")
    (folder / "best.pt").write_bytes(b"best" * 100)
    seal(folder, epoch=3)
    return folder


def test_a_sealed_folder_is_intact_and_a_cut_changed_or_missing_file_is_named(tmp_path):
    folder = _sealed(tmp_path / "epoch_0003")
    assert verify(folder) is None
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["epoch"] == 3 and set(manifest["files"]) == {"state.pt", "best.pt"}
    whole = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(whole[: len(whole) // 2])  # a full disk, a node lost mid-write
    assert verify(folder) == f"state.pt holds {len(whole) // 2} bytes, {len(whole)} were written"
    (folder / "state.pt").write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))  # same size, one bit flipped
    assert verify(folder) == "state.pt's SHA-256 differs from the one written"
    (folder / "state.pt").unlink()
    assert verify(folder) == "state.pt is missing"


def test_a_folder_without_a_manifest_is_damaged_however_whole_its_files(tmp_path):
    folder = _sealed(tmp_path / "epoch_0001")
    (folder / MANIFEST_FILE).unlink()  # cut short between its files and its seal
    assert verify(folder) == f"it has no {MANIFEST_FILE} (cut short before its seal)"


def test_checkpoint_names_order_by_epoch_and_are_never_reused():
    assert unused_name(2, set()) == "epoch_0002"
    assert unused_name(2, {"epoch_0002", "epoch_0002-2"}) == "epoch_0002-3"
    names = ["epoch_0001", "stopped_0002_ab12cd34", "epoch_0002-2", "epoch_0002", "epoch_0010"]
    assert sorted(names, key=order) == [
        "epoch_0001",
        "stopped_0002_ab12cd34",
        "epoch_0002",
        "epoch_0002-2",
        "epoch_0010",
    ]
    assert order("final") is None and order("checkpoint_manager_snapshot.json") is None


def _interrupted(straight: Path, out: Path, epochs: list[str]) -> Path:
    """An out_dir holding `straight`'s first checkpoints only: a run stopped after them."""
    for name in epochs:
        shutil.copytree(straight / "checkpoints" / name, out / "checkpoints" / name)
    return out


def _cut(path: Path) -> int:
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 3])
    return len(whole)


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_resumes_to_the_uninterrupted_end(
    straight, tmp_path, capsys
):
    out = _interrupted(straight, tmp_path / "resumed", ["epoch_0000", "epoch_0001"])
    _cut(out / "checkpoints/epoch_0001/state.pt")
    summary = train(_cfg(out))
    err = capsys.readouterr().err
    assert f"the checkpoint {out / 'checkpoints/epoch_0001'} is damaged: state.pt holds" in err
    assert f"resuming from {out / 'checkpoints/epoch_0000'} after epoch 1/3" in err
    assert summary["resumed_at_epoch"] == 1
    # Epoch 2 saved again under a new name (the damaged one keeps its own), then epoch 3.
    assert (out / "checkpoints/epoch_0001-2").is_dir() and verify(out / "checkpoints/epoch_0001-2") is None
    a = read_checkpoint(out / "checkpoints/epoch_0002/state.pt")["engine"]
    b = read_checkpoint(straight / "checkpoints/epoch_0002/state.pt")["engine"]
    for net in ("tnn", "source"):
        for key in b[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)
    straight_summary = json.loads((straight / "summary.json").read_text())
    assert summary["test_acc"] == straight_summary["test_acc"]


def test_every_checkpoint_damaged_stops_for_good_in_one_error_naming_them(straight, tmp_path):
    out = _interrupted(straight, tmp_path / "damaged", ["epoch_0000", "epoch_0001"])
    for name in ("epoch_0000", "epoch_0001"):
        _cut(out / "checkpoints" / name / "state.pt")
    with pytest.raises(CheckpointDamaged) as caught:
        train(_cfg(out))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(
        f"no intact checkpoint to resume: {out / 'checkpoints/epoch_0001'}"
    )
    assert "and 1 more are damaged" in message
    # Reported as a stop for good (under Ray: the latest checkpoint, so no restart retries it).
    [stopped] = (out / "checkpoints").glob("stopped_*")
    assert json.loads((stopped / "stopped.json").read_text()) == {"message": message, "error": "CheckpointDamaged"}
    assert not (out / "summary.json").exists()


def test_a_launch_whose_stored_checkpoints_are_all_damaged_is_refused_in_one_line_before_ray_starts(straight, tmp_path):
    out = tmp_path / "run"
    stored = out / "ray" / out.name / "epoch_0000"
    shutil.copytree(straight / "checkpoints/epoch_0000", stored)
    size = _cut(stored / "state.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distswitch.cli",
            "train",
            str(ROOT / "configs/fashion_mlp.yaml"),
            *SHORT,
            f"out_dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"distswitch: error: no intact checkpoint to resume: {stored} (state.pt holds {size // 3} bytes, "
        f"{size} were written) is damaged; remove them to start again, or pass another out_dir "
        "(or distributed.name)"
    ], proc.stderr[-3000:]
    assert not (stored.parent / "checkpoint_manager_snapshot.json").exists()  # Ray Train never ran
