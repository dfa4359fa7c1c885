"""The alternating engine: each phase trains only its own side; methods' factors and penalties."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import FASHION_INFO, fake_batch, make_config
from distswitch.build import build
from distswitch.config import ConfigError
from distswitch.engine import Engine
from distswitch.gates import kept_report
from distswitch.schedule import Phase
from distswitch.stop import TrainingStopped

CPU = torch.device("cpu")


def _engine(name: str = "lenet5", method: str = "switch", steps_per_epoch: int = 10, **sections) -> Engine:
    sections.setdefault("schedule", {"warmup_epochs": 0})
    train = {"epochs": 3, **sections.pop("train", {})}
    cfg = make_config(model={"name": name}, method=method, train=train, **sections)
    torch.manual_seed(0)
    tnn, gates, meth = build(cfg, FASHION_INFO, steps_per_epoch, CPU)
    return Engine(cfg, tnn, gates, meth, CPU)


def _tnn_state(engine: Engine) -> dict[str, torch.Tensor]:
    tnn = engine.tnn
    return {n: t.detach().clone() for n, t in [*tnn.named_parameters(), *tnn.named_buffers()]}


def _source_state(engine: Engine) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in engine.source.state_dict().items()}


def _changed(before: dict, after: dict) -> list[str]:
    return [n for n in before if not torch.equal(before[n], after[n])]


def _steps(engine: Engine, phase: Phase, n: int, epoch: int = 0) -> None:
    for i in range(n):
        engine.step(epoch, phase, *fake_batch(4, seed=i))


MODELS = ["mlp", "lenet5", "mobilenet_v2", "vgg16"]  # the last two: BatchNorm statistics too


# -- phase freezing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_snn_steps_leave_every_tnn_parameter_and_buffer_bit_identical(name):
    engine = _engine(name)
    _steps(engine, Phase.TNN, 2)  # non-trivial optimiser state and BatchNorm statistics first
    tnn, source = _tnn_state(engine), _source_state(engine)
    _steps(engine, Phase.SNN, 3)
    assert _changed(tnn, _tnn_state(engine)) == []
    assert _changed(source, _source_state(engine)), "the switcher did not learn in its own phase"


@pytest.mark.parametrize("name", MODELS)
def test_tnn_steps_leave_every_switcher_parameter_bit_identical(name):
    engine = _engine(name)
    _steps(engine, Phase.SNN, 2)
    tnn, source = _tnn_state(engine), _source_state(engine)
    _steps(engine, Phase.TNN, 3)
    assert _changed(source, _source_state(engine)) == []
    changed = _changed(tnn, _tnn_state(engine))
    assert {n for n, _ in engine.tnn.named_parameters()} <= set(changed)


def test_batchnorm_statistics_move_only_in_tnn_steps():
    engine = _engine("mobilenet_v2")
    bn = [n for n, _ in engine.tnn.named_buffers() if n.endswith("running_mean")]
    assert bn, "mobilenet_v2 has no BatchNorm statistics to check"
    before = _tnn_state(engine)
    _steps(engine, Phase.SNN, 1)
    assert _changed(before, _tnn_state(engine)) == []
    _steps(engine, Phase.TNN, 1)
    assert set(bn) <= set(_changed(before, _tnn_state(engine)))


def test_the_gates_carry_the_switchers_factors_after_a_step():
    engine = _engine("mlp")
    engine.step(0, Phase.TNN, *fake_batch())
    expected = engine.compute_factors(0)
    assert [torch.equal(a, b) for a, b in zip(engine.gates.factors, expected)] == [True, True]


def test_warmup_epochs_run_the_dense_network():
    engine = _engine("mlp", schedule={"warmup_epochs": 1})
    assert engine.compute_factors(0) is None
    engine.step(0, Phase.TNN, *fake_batch())
    assert engine.gates.factors is None
    assert engine.compute_factors(1) is not None


def test_an_epoch_takes_k_tnn_steps_per_snn_step():
    engine = _engine("mlp", schedule={"warmup_epochs": 0, "update_ratio": 4})
    batches = [fake_batch(4, seed=i) for i in range(10)]
    stats = engine.train_epoch(0, batches, batches[:2])
    assert stats.steps == {"tnn": 8, "snn": 2}
    assert stats.gated and 0 <= stats.val_acc <= 1


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_an_snn_step_gives_every_graph_switcher_parameter_a_gradient(name):
    # DDP's reducer (no find_unused_parameters) waits for a gradient of every parameter.
    engine = _engine(name, switcher={"arch": "graph"})
    x, y = fake_batch(4, seed=0)
    grads = {}
    hooks = [p.register_hook(lambda g, n=n: grads.setdefault(n, g)) for n, p in engine.source.named_parameters()]
    engine.step(0, Phase.SNN, x, y)
    for h in hooks:
        h.remove()
    assert sorted(grads) == sorted(n for n, _ in engine.source.named_parameters())
    assert any(n.startswith("rounds.") for n in grads)


def test_extra_snn_steps_leave_the_tnn_a_step_on_every_batch():
    engine = _engine("mlp", schedule={"warmup_epochs": 0, "update_ratio": 4, "snn_steps": "extra"})
    batches = [fake_batch(4, seed=i) for i in range(10)]
    stats = engine.train_epoch(0, batches, batches[:2])
    assert stats.steps == {"tnn": 10, "snn": 2}


def test_a_phase_without_steps_in_an_epoch_does_not_warn_about_its_scheduler():
    # During the warm-up the SNN optimizer takes no step, yet its (per-epoch) scheduler advances;
    # the engine means to silence torch's "scheduler before optimizer" warning for that.
    engine = _engine("mlp", schedule={"warmup_epochs": 1})
    batches = [fake_batch(4, seed=i) for i in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = engine.train_epoch(0, batches, batches[:1])
    assert stats.steps == {"tnn": 3, "snn": 0}
    assert [str(w.message) for w in caught if "lr_scheduler" in str(w.message)] == []


def test_finetune_epochs_keep_the_factors_but_freeze_the_switcher():
    engine = _engine("mlp", schedule={"warmup_epochs": 0, "update_ratio": 1, "finetune_epochs": 1}, train={"epochs": 2})
    batches = [fake_batch(4, seed=i) for i in range(4)]
    assert engine.train_epoch(0, batches, batches[:1]).steps == {"tnn": 2, "snn": 2}
    source = _source_state(engine)
    stats = engine.train_epoch(1, batches, batches[:1])
    assert stats.steps == {"tnn": 4, "snn": 0} and stats.gated
    assert engine.gates.factors is not None
    assert _changed(source, _source_state(engine)) == []


# -- penalties and methods ------------------------------------------------------------------------


def _mean_factor(engine: Engine) -> float:
    return float(torch.cat([f.flatten() for f in engine.compute_factors(0)]).mean())


def test_l1_penalty_is_the_mean_factor_times_the_coefficient():
    engine = _engine("mlp", switcher={"l1": 0.25})
    factors = engine.compute_factors(0)  # a fresh switcher: every factor is exactly 1
    assert float(engine.method.penalty(factors, 0)) == pytest.approx(0.25)
    assert _engine("mlp").method.penalty(factors, 0) == 0


def _on(n: int) -> list[torch.Tensor]:
    """mlp factors (300 + 100 units) with the first n units on (factor 1), the rest off."""
    flat = (torch.arange(400) < n).float()
    return [flat[:300], flat[300:]]


def test_l1_penalty_acts_only_above_the_target_kept_fraction():
    method = _engine("mlp", switcher={"l1": 0.5, "target_kept": 0.6}).method
    assert float(method.penalty(_on(400), 0)) == pytest.approx(0.5)
    assert float(method.penalty(_on(241), 0)) == pytest.approx(0.5 * 241 / 400)
    assert method.penalty(_on(100), 0) == 0


def test_l1_penalty_below_the_target_pushes_no_factor():
    method = _engine("mlp", switcher={"l1": 0.5, "target_kept": 0.6}).method
    below, above = (torch.cat(_on(n)).requires_grad_() for n in (100, 300))
    for factors in (below, above):
        method.penalty([factors[:300], factors[300:]], 0).backward()
    assert torch.count_nonzero(below.grad) == 0 and torch.count_nonzero(above.grad) == 400


def test_l1_penalty_stops_exactly_at_the_target_kept_fraction():
    method = _engine("mlp", switcher={"l1": 0.5, "target_kept": 0.6}).method
    assert method.penalty(_on(240), 0) == 0  # 240 / 400 = 0.6 is not above the target


def test_l1_penalty_pushes_factors_down_in_snn_steps():
    plain = _engine("lenet5", switcher={"l1": 0.0}, optim={"snn": {"lr": 1e-2}})
    sparse = _engine("lenet5", switcher={"l1": 100.0}, optim={"snn": {"lr": 1e-2}})
    for engine in (plain, sparse):
        for _ in range(5):
            engine.step(0, Phase.SNN, *fake_batch(4, seed=0))
    assert _mean_factor(sparse) < _mean_factor(plain)
    assert _mean_factor(sparse) < 1.0


def test_dense_method_has_no_switcher_and_no_snn_optimizer():
    engine = _engine("lenet5", method="dense")
    assert engine.source is None
    assert set(engine.optimizers) == {Phase.TNN}
    assert engine.compute_factors(2) is None
    engine.step(2, Phase.TNN, *fake_batch())
    assert engine.gates.factors is None


def test_slimming_scales_train_with_the_tnn():
    engine = _engine("mlp", method="slimming", prune={"finetune_epochs": 1})
    assert set(engine.optimizers) == {Phase.TNN}
    before = _source_state(engine)
    engine.step(0, Phase.TNN, *fake_batch())
    assert [n for n in _changed(before, _source_state(engine)) if n.startswith("scales")]


@pytest.mark.parametrize(
    "name, kept_fraction, expected",
    [
        ("lenet5", 0.5, {"conv1": 10, "conv2": 25, "fc1": 250}),
        ("lenet5", 0.25, {"conv1": 5, "conv2": 13, "fc1": 125}),
        ("mlp", 0.55, {"fc1": 165, "fc2": 55}),
    ],
)
def test_magnitude_keeps_ceil_fraction_of_units_per_layer_at_the_prune_epoch(name, kept_fraction, expected):
    engine = _engine(name, method="magnitude", prune={"kept_fraction": kept_fraction, "finetune_epochs": 1})
    method, gates = engine.method, engine.gates
    for epoch in (0, 1):  # before the prune epoch (train.epochs=3 - finetune 1 = 2): dense
        method.on_epoch_start(epoch, gates.views())
        assert engine.compute_factors(epoch) is None
        assert kept_report(gates.specs, method.source(gates.views()))["kept_fraction"] == 1.0
    method.on_epoch_start(2, gates.views())
    factors = engine.compute_factors(2)
    report = kept_report(gates.specs, factors)
    assert {layer: row["kept"] for layer, row in report["layers"].items()} == expected
    for w, f in zip(gates.views(), factors):
        norms = w.incoming.detach().norm(dim=1)
        assert float(norms[f == 0].max()) <= float(norms[f == 1].min()), "a weaker unit was kept"


def test_group_magnitude_keeps_a_unit_whose_outgoing_weights_are_large_where_incoming_magnitude_cuts_it():
    kept = {}
    for importance in ("incoming", "group"):
        engine = _engine(
            "mlp", method="magnitude", prune={"kept_fraction": 0.5, "finetune_epochs": 1, "importance": importance}
        )
        modules = dict(engine.tnn.named_modules())
        with torch.no_grad():  # fc1's unit 7: the weakest incoming row, but what it feeds is 100x
            modules["fc1"].weight[7].mul_(1e-3)
            modules["fc2"].weight[:, 7].mul_(100.0)
        engine.method.on_epoch_start(2, engine.gates.views())
        kept[importance] = float(engine.compute_factors(2)[0][7])
    assert kept == {"incoming": 0.0, "group": 1.0}


def test_state_dict_round_trip_restores_the_factors():
    engine = _engine("mlp")
    _steps(engine, Phase.SNN, 2)
    _steps(engine, Phase.TNN, 2)
    restored = _engine("mlp")
    restored.load_state_dict(engine.state_dict())
    for a, b in zip(engine.compute_factors(0), restored.compute_factors(0)):
        assert torch.equal(a, b)
    assert _changed(_tnn_state(engine), _tnn_state(restored)) == []


def _nan_at(index: int, n: int = 10) -> list:
    batches = [fake_batch(4, seed=i) for i in range(n)]
    batches[index][0][0, 0, 0, 0] = float("nan")
    return batches


@pytest.mark.parametrize("index, phase", [(5, "TNN"), (4, "SNN")])
def test_a_non_finite_loss_stops_the_epoch_naming_its_step_and_phase(index, phase):
    engine = _engine("mlp", schedule={"warmup_epochs": 0, "update_ratio": 4})  # steps 0-3 TNN, 4 SNN, ...
    with pytest.raises(
        TrainingStopped,
        match=rf"loss is not finite at step {index + 1} of epoch 1 \({phase} phase, worker 0\); "
        "lower optim.tnn.lr or optim.snn.lr",
    ):
        engine.train_epoch(0, _nan_at(index), [fake_batch(4)])


def test_non_finite_factors_stop_training_at_the_first_step():
    engine = _engine("mlp", schedule={"warmup_epochs": 0, "update_ratio": 4})
    with torch.no_grad():
        engine.source.neuron_head.bias.fill_(float("inf"))
    with pytest.raises(
        TrainingStopped,
        match=r"diverged: the switcher's factors are not finite at step 1 of epoch 1 .*lower optim.snn.lr",
    ):
        engine.train_epoch(0, [fake_batch(4, seed=i) for i in range(3)], [fake_batch(4)])


def test_a_layer_switched_entirely_off_stops_training_unless_min_kept_is_zero():
    batches = [fake_batch(4, seed=i) for i in range(3)]
    for floor in (1, 0):
        engine = _engine(
            "mlp", schedule={"warmup_epochs": 0, "update_ratio": 4}, switcher={"init_factor": 1.0, "min_kept": floor}
        )
        with torch.no_grad():
            engine.source.neuron_head.bias.fill_(-10.0)  # every factor exactly 0
        if floor:
            with pytest.raises(
                TrainingStopped, match=r"fewer than switcher.min_kept=1 units in .*\(0 of \d+\) after epoch 1"
            ):
                engine.train_epoch(0, batches, batches[:1])
        else:
            assert engine.train_epoch(0, batches, batches[:1]).kept_fraction == 0


def test_min_kept_above_the_smallest_layer_is_a_config_error():
    with pytest.raises(ConfigError, match=r"switcher.min_kept: got 100000; layer .* has only \d+ units"):
        _engine("mlp", switcher={"min_kept": 100000})
    _engine("mlp", method="dense", switcher={"min_kept": 100000})  # no switcher: nothing to keep


def test_a_resumed_engine_takes_the_configs_new_learning_rate_not_the_checkpoints():
    old = _engine(
        "mlp", optim={"snn": {"name": "adam", "lr": 1.0}, "tnn": {"name": "sgd", "lr": 0.1, "scheduler": "cosine"}}
    )
    batches = [fake_batch(4, seed=i) for i in range(5)]
    old.train_epoch(0, batches, batches[:1])
    state = old.state_dict()
    new = _engine(
        "mlp", optim={"snn": {"name": "adam", "lr": 1e-3}, "tnn": {"name": "sgd", "lr": 0.01, "scheduler": "cosine"}}
    )
    new.load_state_dict(state)
    assert (
        new.optimizers[Phase.SNN].param_groups[0]["lr"] == old.optimizers[Phase.SNN].param_groups[0]["lr"]
    )  # a bare load
    new.retune(old.cfg.to_dict()["optim"])
    for ph, factor in ((Phase.SNN, 1e-3), (Phase.TNN, 0.1)):  # the new rate, at the same point of its schedule
        assert new.optimizers[ph].param_groups[0]["lr"] == pytest.approx(
            old.optimizers[ph].param_groups[0]["lr"] * factor
        )
        new.schedulers[ph].step()
        old.schedulers[ph].step()
        assert new.optimizers[ph].param_groups[0]["lr"] == pytest.approx(
            old.optimizers[ph].param_groups[0]["lr"] * factor
        )


# -- sparse learning (budget.sparse_learning) -------------------------------------------------------


def _group_norms(engine: Engine) -> list[torch.Tensor]:
    return [n.detach().sqrt() for n in engine.gates.unit_sq_norms()]


def test_a_units_group_norm_covers_its_incoming_weights_bias_and_outgoing_weights_by_hand():
    engine = _engine("lenet5", method="dense")
    conv2, fc1 = engine.tnn.conv2, engine.tnn.fc1
    c = 7  # conv2's channel 7: fc1 reads it at its 16 flattened positions (50 x 4 x 4, channel-major)
    by_hand = (
        conv2.weight[c].square().sum() + conv2.bias[c].square() + fc1.weight[:, c * 16 : (c + 1) * 16].square().sum()
    )
    layer = [s.layer for s in engine.gates.specs].index("conv2")
    assert torch.allclose(engine.gates.unit_sq_norms()[layer][c], by_hand)


def test_a_units_group_norm_includes_the_batchnorm_that_follows_it():
    engine = _engine("vgg16", method="dense")
    spec = engine.gates.specs[0]
    bn = dict(engine.tnn.named_modules())[spec.point]
    with torch.no_grad():
        before = engine.gates.unit_sq_norms()[0].clone()
        bn.weight[0] += 3.0
    after = engine.gates.unit_sq_norms()[0]
    assert spec.point != spec.layer
    assert torch.allclose(after[0] - before[0], (bn.weight[0].square() - (bn.weight[0] - 3.0).square()).detach())
    assert torch.equal(after[1:], before[1:])


@pytest.mark.parametrize("method", ["switch", "magnitude"])
def test_sparse_learning_shrinks_the_units_the_final_cut_removes_and_no_others(method):
    sections = {
        "budget": {"fraction": 0.3, "sparse_learning": 0.5},
        "schedule": {"warmup_epochs": 0, "finetune_epochs": 1},
        "prune": {"finetune_epochs": 1, "schedule": "gradual"},
        "train": {"epochs": 4},
    }
    engine = _engine("mlp", method=method, **sections)
    quiet = _engine("mlp", method=method, **{**sections, "budget": {"fraction": 0.3}})
    if method == "switch":  # a trained switcher: a fresh one gives every unit the same factor
        for e in (engine, quiet):
            _steps(e, Phase.SNN, 3)
    engine.method.on_epoch_start(1, engine.gates.views())  # a switching epoch after the first: sparse learning is on
    quiet.method.on_epoch_start(1, quiet.gates.views())
    shrink = engine.method.shrink
    assert shrink is not None and 0 < sum(t.sum() for t in shrink) < sum(t.numel() for t in shrink)
    assert quiet.method.shrink is None
    for e in (engine, quiet):
        _steps(e, Phase.TNN, 5, epoch=1)
    after, plain = _group_norms(engine), _group_norms(quiet)
    ratio = torch.cat(after) / torch.cat(plain)
    shrunk = torch.cat(shrink).bool()
    # A kept unit shares weights with removed ones (its incoming weights from removed units of the
    # layer before are theirs too), so it shrinks a little, but far less than they do.
    assert ratio[shrunk].max() < ratio[~shrunk].min()  # measured: 0.50 against 0.70 (switch), 0.47 against 0.70
    engine.method.on_epoch_start(3, engine.gates.views())  # fine-tuning: the cut is made, nothing shrinks
    assert engine.method.shrink is None
