"""Checkpoints resume onto any training device: read onto the CPU, placed by `load_state_dict`.

A GPU run's resume used to load the bundle straight onto the GPU: its RNG states then reached
`torch.set_rng_state` as CUDA tensors (refused), and its optimisers' step counters lived on the GPU
(a host sync per parameter per step). `meta` stands in for the GPU here: a device that is not the
CPU, on which nothing can be read back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import FASHION_INFO, fake_batch, make_config
from distswitch.build import build
from distswitch.checkpoint import bundle as checkpoint_bundle
from distswitch.checkpoint import read as read_checkpoint
from distswitch.checkpoint import rng_state, set_rng
from distswitch.engine import Engine
from distswitch.io import save_torch
from distswitch.schedule import Phase

CPU, META = torch.device("cpu"), torch.device("meta")


def _engine(device: torch.device) -> tuple:
    cfg = make_config(model={"name": "lenet5"}, method="switch", schedule={"warmup_epochs": 0})
    tnn, gates, method = build(cfg, FASHION_INFO, 10, device)
    return cfg, Engine(cfg, tnn, gates, method, device)


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint of a CPU engine after a TNN and an SNN step (both optimisers hold state), with
    this process's generators; and the draws those generators give next."""
    torch.manual_seed(0)
    cfg, engine = _engine(CPU)
    for phase in (Phase.TNN, Phase.SNN):
        engine.step(0, phase, *fake_batch(8))
    path = tmp_path / "state.pt"
    save_torch(checkpoint_bundle(cfg, FASHION_INFO, engine, 0, 10, [], None, [rng_state()]), path)
    return path, torch.rand(4)


def test_rng_states_loaded_onto_another_device_are_refused_by_torch(checkpoint):
    """The bug's cause: what `map_location=<the training device>` did to the saved generators."""
    path, _ = checkpoint
    moved = torch.load(path, map_location="meta", weights_only=True)
    with pytest.raises(TypeError, match="ByteTensor"):
        torch.set_rng_state(moved["rng"][0]["torch"])


# Copies onto `meta` are no-ops (nothing is stored there), which torch warns about per tensor.
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_a_checkpoint_resumes_onto_a_non_cpu_device_with_cpu_generators_and_host_step_counters(checkpoint):
    path, draws = checkpoint
    state = read_checkpoint(path)
    saved = state["rng"][0]["torch"]
    assert saved.device == CPU and saved.dtype == torch.uint8
    _, engine = _engine(META)
    engine.load_state_dict(state["engine"])
    torch.manual_seed(123)
    set_rng(state["rng"], rank=0)
    assert torch.equal(torch.rand(4), draws)  # the generators continue where the checkpoint left them
    for opt in engine.optimizers.values():
        slots = [
            (name, t)
            for per_param in opt.state.values()
            for name, t in per_param.items()
            if isinstance(t, torch.Tensor)
        ]
        assert slots
        for name, t in slots:  # momenta and moments next to their parameters; counters on the host
            assert t.device == (CPU if name == "step" else META), (name, t.device)


# tests/fixtures/resume_v2: an out_dir of this checkpoint format (distswitch.ckpt/2), left by a run of
# its config.yaml after epoch 2 of 3 (tests/fixtures/resume_v2/README.md says how it was made). Every
# later version of the format must still resume it, or refuse it in one line.
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "resume_v2"


@pytest.mark.slow
def test_a_checkpoint_of_todays_format_written_earlier_resumes_and_finishes(tmp_path):
    import json
    import shutil

    from distswitch.config import load_config
    from distswitch.worker import train

    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    shutil.copytree(FIXTURE, resumed)
    old = read_checkpoint(resumed / "checkpoints/epoch_0001/state.pt")
    for out in (resumed, straight):
        train(load_config(FIXTURE / "config.yaml", [f"out_dir={out}"]))
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_at_epoch"] == 2  # not a fresh start
    assert abs(summary["compact"]["macs"] / summary["dense"]["macs"] - 0.5) <= 0.01  # and it finished

    def measured(history):  # what training gave each epoch, not how long it took
        return [(h["epoch"], h["train_loss"], h["val_loss"], h["val_acc"], h["kept"]) for h in history]

    a = read_checkpoint(resumed / "checkpoints/epoch_0002/state.pt")
    b = read_checkpoint(straight / "checkpoints/epoch_0002/state.pt")
    assert measured(a["history"][:2]) == measured(old["history"])  # the fixture's epochs, carried on
    for key in ("tnn", "source", "optimizers", "schedulers"):  # the layout of every state
        assert a["engine"][key].keys() == b["engine"][key].keys(), key


def test_a_checkpoint_of_another_format_version_is_refused_in_one_line(tmp_path):
    import shutil

    from distswitch.config import ConfigError, load_config
    from distswitch.manifest import seal
    from distswitch.worker import train

    out = tmp_path / "run"
    shutil.copytree(FIXTURE, out)
    folder = out / "checkpoints" / "epoch_0001"
    state = read_checkpoint(folder / "state.pt")
    state["format"] = "distswitch.ckpt/999"
    torch.save(state, folder / "state.pt")
    seal(folder, state["epoch"])  # intact, only of another version
    with pytest.raises(ConfigError) as refused:
        train(load_config(FIXTURE / "config.yaml", [f"out_dir={out}"]))
    message = str(refused.value)
    assert (
        "was written by another version of distswitch (format 'distswitch.ckpt/999'; this version reads "
        "'distswitch.ckpt/2')"
        in message
        and "\n" not in message
    )
