"""The GPU path's promises, checked where torch sees a CUDA device (skipped elsewhere: CI has none;
run `pytest tests/test_gpu.py` on a GPU host). Synthetic data only: a GPU host need not have the
Debian Fashion-MNIST that the other tests' session fixture prepares."""

from __future__ import annotations

import pytest
import torch

from conftest import FASHION_INFO, fake_batch, indexed_mnist, make_config
from distswitch.build import build
from distswitch.data import make_loaders
from distswitch.engine import Engine
from distswitch.schedule import Phase

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="session")
def fashion_betons():
    """Overrides conftest's autouse preparation of Fashion-MNIST: nothing here reads it."""
    return None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_never_wait_for_the_host(precision):
    gpu = torch.device("cuda")
    # The default job's switcher settings: the L1 term's target test runs in every SNN step.
    cfg = make_config(
        model={"name": "lenet5"},
        method="switch",
        schedule={"warmup_epochs": 0},
        switcher={"l1": 0.5, "target_kept": 0.6},
        distributed={"use_gpu": True},
        train={"device": "cuda", "precision": precision},
    )
    tnn, gates, meth = build(cfg, FASHION_INFO, 10, gpu)
    engine = Engine(cfg, tnn, gates, meth, gpu)
    x, y = (t.to(gpu) for t in fake_batch(64))
    phases = [Phase.TNN, Phase.TNN, Phase.SNN]
    for ph in phases:  # first steps: cuDNN's kernel search and the allocator may synchronise
        engine.step(0, ph, x, y)
    torch.cuda.set_sync_debug_mode("error")  # any device->host wait in the step raises
    try:
        for ph in phases:
            engine.step(0, ph, x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.tnn[3].weight.is_contiguous(memory_format=torch.channels_last)  # null = on


def test_ffcv_gpu_pipeline_hands_normalised_channels_last_batches_on_the_device(tmp_path):
    pytest.importorskip("ffcv")
    from distswitch.data.beton import prepare

    root, betons = indexed_mnist(tmp_path / "mnist", 600, 50), tmp_path / "betons"
    prepare("mnist", betons, root=str(root), val_size=40, log=lambda line: None)
    cfg = make_config(
        data={
            "dataset": "mnist",
            "root": str(root),
            "beton_dir": str(betons),
            "val_size": 40,
            "channels": 3,
            "image_size": 32,
        },
        train={"device": "cuda", "precision": "bf16", "batch_size": 128},
        distributed={"use_gpu": True},
    )
    loaders = make_loaders(cfg, 0, 1, torch.device("cuda"))
    x, y = next(iter(loaders.train))
    assert x.device.type == "cuda" and y.device.type == "cuda"
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert abs(float(x.float().mean())) < 1.0  # normalised, not raw 0..255 pixels
