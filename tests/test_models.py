"""Every registered network, pruned to an exact budget (as timm tests every registered model): it
builds with every prunable unit group gated, trains steps of both phases on inputs of its shape,
meets the budget within 1% on its exported compact model, whose outputs equal the gated model's,
keeps every group at budget.min_width, and resumes from its saved state."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from conftest import FASHION_INFO, make_config
from distswitch.artifacts import export_compact
from distswitch.build import build
from distswitch.engine import Engine
from distswitch.methods.base import min_units
from distswitch.models import list_models
from distswitch.schedule import Phase

CPU = torch.device("cpu")
INFO = dataclasses.replace(FASHION_INFO, name="synthetic", channels=3, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
FRACTION = 0.5


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]


def _engine(cfg) -> Engine:
    torch.manual_seed(0)
    tnn, gates, method = build(cfg, INFO, 2, CPU)
    return Engine(cfg, tnn, gates, method, CPU)


def _config(name: str, method: str, kind: str, tmp_path):
    return make_config(
        model={"name": name, "gated": "all"},
        method=method,
        budget={"kind": kind, "fraction": FRACTION},
        train={"epochs": 2, "batch_size": 8},
        schedule={"warmup_epochs": 0, "finetune_epochs": 1, "update_ratio": 1},
        prune={"finetune_epochs": 1},
        optim={"tnn": {"lr": 0.01}},
        out_dir=str(tmp_path / "run"),
    )


def _prune_and_check(cfg, tmp_path) -> tuple[Engine, dict]:
    engine = _engine(cfg)
    for epoch in range(cfg.train.epochs):  # epoch 0 switches (a TNN and an SNN step), epoch 1 cuts and fine-tunes
        stats = engine.train_epoch(epoch, _batches(2, seed=epoch), _batches(1, seed=9))
    assert stats.steps["tnn"] >= 1
    last = cfg.train.epochs - 1
    example = _batches(1, seed=5)[0][0]
    report = export_compact(cfg, INFO, engine, last, example, tmp_path / "model.pt")  # raises past 1e-4
    kind = cfg.budget.kind
    spent = report["compact"][kind] / report["dense"][kind]
    assert abs(spent - FRACTION) <= 0.01, f"{cfg.model.name} ({cfg.method}): {spent:.4f} of the dense {kind}"
    assert report["export_max_abs_diff"] <= 1e-4
    floors = min_units(cfg, engine.gates.specs)
    for spec, floor in zip(engine.gates.specs, floors):
        kept = report["kept_per_layer"][spec.layer]["kept"]
        assert kept >= floor >= math.ceil(0.1 * spec.units), (spec.layer, kept, floor)
    return engine, report


@pytest.mark.parametrize("kind", ["macs", "params"])
@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_meets_the_budget_exports_exactly_and_resumes(name, kind, tmp_path):
    cfg = _config(name, "switch", kind, tmp_path)
    engine, _ = _prune_and_check(cfg, tmp_path)
    # Resume: the saved state into a fresh build gives the same factors and the same next step.
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    buffer.seek(0)
    resumed = _engine(cfg)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(engine.compute_factors(1), resumed.compute_factors(1)):
        assert torch.equal(a, b)
    x, y = _batches(1, seed=3)[0]
    for e in (engine, resumed):
        e.method.on_epoch_start(1, e.gates.views())
        e.step(1, Phase.TNN, x, y)
    for (n, a), (_, b) in zip(engine.tnn.state_dict().items(), resumed.tnn.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("method", ["magnitude", "slimming"])
@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "vgg19"])
def test_the_baselines_cut_the_same_unit_groups_to_the_budget(name, method, tmp_path):
    switch_specs = _engine(_config(name, "switch", "macs", tmp_path)).gates.specs
    engine, _ = _prune_and_check(_config(name, method, "macs", tmp_path), tmp_path)
    assert engine.gates.specs == switch_specs


# The field's benchmark configs, ready for a GPU cluster: valid as shipped, and two steps of each phase
# on inputs of their shape (CIFAR-10 32x32, ImageNet 224x224 with 1,000 classes) on this CPU.
FIELD_CONFIGS = {
    "cifar10_resnet56.yaml": (10, 32),
    "cifar10_vit_tiny.yaml": (10, 32),
    "imagenet_resnet50.yaml": (1000, 224),
}


@pytest.mark.parametrize("name", sorted(FIELD_CONFIGS))
def test_the_field_s_benchmark_configs_build_and_step_on_inputs_of_their_shape(name):
    from distswitch.config import load_config

    classes, size = FIELD_CONFIGS[name]
    cfg = load_config(
        f"configs/{name}", ["train.device=cpu", "train.precision=fp32", "train.compile=none", "train.progress=false"]
    )
    info = dataclasses.replace(INFO, num_classes=classes, image_size=size)
    torch.manual_seed(0)
    tnn, gates, method = build(cfg, info, 100, CPU)
    engine = Engine(cfg, tnn, gates, method, CPU)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, size, size, generator=gen), torch.randint(0, classes, (2,), generator=gen)
    first_switching = cfg.schedule.warmup_epochs
    for phase in (Phase.TNN, Phase.SNN, Phase.TNN, Phase.SNN):
        losses = engine.step(first_switching, phase, x, y)
        assert all(torch.isfinite(t).all() for t in losses)
    assert engine.gates.factors is not None and len(engine.gates.specs) > 10
