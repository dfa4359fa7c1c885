"""Gates (where factors act), switchers (weights in, factors out) and the phase schedule."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import nn

from distswitch.config import SwitcherConfig
from distswitch.coupling import find_readers
from distswitch.gates import GateSet, check_factors, find_gates
from distswitch.models import create_tnn, list_models
from distswitch.schedule import Alternation, Phase
from distswitch.switcher import build_switcher, edges, revivable_relu

MODELS = list_models()
GATED = ("all", "fc", "classifier")
GRANULARITIES = ("neuron", "connection")
SMALL = ("mlp", "lenet5")  # the U-Net switcher is only exercised on these (slow on big nets)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_tnn(name, 3, 10, 32).eval()


def _input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@functools.lru_cache(maxsize=None)
def _has_hidden_linear(name: str) -> bool:
    return len(_linears(_model(name))) > 1


def _selects_nothing(name: str, gated: str, granularity: str) -> bool:
    """Only 'fc' neuron gating of a model whose one Linear is its classifier selects no layer."""
    return gated == "fc" and granularity == "neuron" and not _has_hidden_linear(name)


def _randomise(switcher: nn.Module, weights: list[torch.Tensor], seed: int = 0) -> None:
    """Re-initialise every parameter so the output depends visibly on the weights; for the rowwise
    and graph switchers the heads' biases are then centred so that about half of the factors are 0."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in switcher.parameters():
            nn.init.normal_(p, std=0.5)
        if not hasattr(switcher, "body"):
            return
        hidden = switcher.hidden(weights)
        if hasattr(switcher, "neuron_head"):
            pre = torch.cat([switcher.neuron_head(h).flatten() for h in hidden])
            switcher.neuron_head.bias.sub_(pre.median())
        if hasattr(switcher, "connection_head"):
            pre = []
            for h, w in zip(hidden, [v.incoming for v in weights]):
                slope, offset = switcher.connection_head(h).unbind(dim=1)
                pre.append((slope[:, None] * w.abs() / w.std() + offset[:, None]).flatten())
            switcher.connection_head.bias[1].sub_(torch.cat(pre).median())


# -- find_gates ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, gated, granularity", list(itertools.product(MODELS, GATED, GRANULARITIES)))
def test_find_gates_raises_only_when_nothing_is_selected(name, gated, granularity):
    model = _model(name)
    if _selects_nothing(name, gated, granularity):
        with pytest.raises(ValueError, match="selects no layer"):
            find_gates(model, gated, granularity, _input(1))
        return
    specs = find_gates(model, gated, granularity, _input(1))
    classifier = _linears(model)[-1]
    assert len({s.layer for s in specs}) == len(specs), "a layer is gated twice"
    if gated == "classifier":
        side = "in" if granularity == "neuron" else "weight"
        assert [(s.layer, s.side) for s in specs] == [(classifier, side)]


@pytest.mark.parametrize("name", MODELS)
def test_all_neuron_gates_every_conv_and_linear_but_the_classifier_each_in_one_unit_group(name):
    model = _model(name)
    specs = find_gates(model, "all", "neuron", _input(1))
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    members = [layer for s in specs for layer, _ in s.members]
    assert len(members) == len(set(members)) and set(members) <= set(layers[:-1]), (
        "a layer in two groups, or the classifier"
    )
    if name == "vit_tiny":  # the units are its heads and MLP units; its residual stream is not gated
        assert [s.layer for s in specs] == [f"blocks.{b}.{part}" for b in range(12) for part in ("attn.v", "mlp.0")]
        assert [(s.units, s.rows, s.heads_of) for s in specs[:2]] == [(3, 64, "blocks.0.attn"), (768, 1, "")]
        return
    assert sorted(members) == sorted(layers[:-1]), "a layer is in no group"
    assert [s.layer for s in specs] == [n for n in layers if n in {s.layer for s in specs}], "groups not in model order"
    modules = dict(model.named_modules())
    for s in specs:
        assert s.side == "out"
        assert s.fan == sum(modules[layer].weight[0].numel() for layer, _ in s.members)
        for layer, point in s.members:
            assert modules[layer].weight.shape[0] == s.units
            # The factor acts after the layer's BatchNorm when one follows, else on the layer itself.
            assert point == layer or isinstance(modules[point], BN_TYPES)


def test_unknown_gated_mode_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match="model.gated"):
        find_gates(_model("mlp"), "everything", "neuron", _input(1))


# -- gated forward with real switchers ----------------------------------------------------------------

CASES = [
    (name, gated, gran, arch)
    for name, gated, gran in itertools.product(MODELS, GATED, GRANULARITIES)
    if not _selects_nothing(name, gated, gran)
    for arch in (("rowwise", "graph", "unet") if name in SMALL else ("rowwise", "graph"))
]


@pytest.mark.parametrize("name, gated, granularity, arch", CASES)
def test_switcher_factors_fit_the_gates_and_the_model_still_classifies(name, gated, granularity, arch):
    model = _model(name)
    specs = find_gates(model, gated, granularity, _input(1))
    gates = GateSet(model, specs)
    switcher = build_switcher(specs, SwitcherConfig(arch=arch, width=8, granularity=granularity))
    _randomise(switcher, gates.views())
    with torch.no_grad():
        factors = switcher(gates.views())
    assert [tuple(f.shape) for f in factors] == [s.factor_shape for s in specs]
    assert all(bool((f >= 0).all()) for f in factors)
    if arch != "unet":  # centred heads: the ReLU really clips, and some units stay on
        flat = torch.cat([f.flatten() for f in factors])
        assert 0 < int((flat == 0).sum()) < flat.numel()
    gates.set(factors)
    with torch.no_grad():
        out = model(_input())
    assert out.shape == (2, 10) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", MODELS)
def test_gates_without_factors_leave_the_output_bit_identical(name):
    model, x = _model(name), _input()
    with torch.no_grad():
        plain = model(x)
        gates = GateSet(model, find_gates(model, "all", "neuron", _input(1)))
        assert torch.equal(model(x), plain)
        gates.set([torch.full(s.factor_shape, 0.5 if k == 0 else 1.0) for k, s in enumerate(gates.specs)])
        assert not torch.equal(model(x), plain)
        gates.set(None)
        assert torch.equal(model(x), plain)


@pytest.mark.parametrize("name, granularity", list(itertools.product(SMALL, GRANULARITIES)))
def test_unit_factors_leave_the_output_bit_identical(name, granularity):
    model, x = _model(name), _input()
    with torch.no_grad():
        plain = model(x)
        gates = GateSet(model, find_gates(model, "all", granularity, _input(1)))
        gates.set([torch.ones(s.factor_shape) for s in gates.specs])
        assert torch.equal(model(x), plain)


@pytest.mark.parametrize("name", MODELS)
def test_zero_factors_on_an_out_gate_make_that_output_exactly_zero(name):
    model, x = _model(name), _input()
    specs = find_gates(model, "all", "neuron", _input(1))
    gates = GateSet(model, specs)
    modules = dict(model.named_modules())
    if not any(isinstance(m, BN_TYPES) for m in model.modules()):
        assert all(s.point == s.layer for s in specs)
    seen = {}
    for s in specs:  # registered after the gates' hooks, so they see the gated output
        modules[s.point].register_forward_hook(lambda m, i, o, key=s.point: seen.__setitem__(key, o.detach().clone()))
    for parity in (0, 1):  # every other gated layer switched off, the rest left on
        off = {k for k in range(len(specs)) if k % 2 == parity}
        gates.set(
            [torch.zeros(s.factor_shape) if k in off else torch.ones(s.factor_shape) for k, s in enumerate(specs)]
        )
        with torch.no_grad():
            model(x)
        for k in off:
            assert seen[specs[k].point].abs().max() == 0, f"{specs[k].point} not switched off"


@pytest.mark.parametrize("name", SMALL)
def test_zero_input_factors_on_the_classifier_leave_only_its_bias(name):
    model, x = _model(name), _input()
    specs = find_gates(model, "classifier", "neuron", _input(1))
    gates = GateSet(model, specs)
    gates.set([torch.zeros(specs[0].factor_shape)])
    bias = dict(model.named_modules())[specs[0].layer].bias
    with torch.no_grad():
        assert torch.equal(model(x), bias.expand(2, -1))


def test_zero_connection_factors_leave_only_the_bias():
    model, x = _model("mlp"), _input()
    specs = find_gates(model, "classifier", "connection", _input(1))
    gates = GateSet(model, specs)
    gates.set([torch.zeros(specs[0].factor_shape)])
    with torch.no_grad():
        assert torch.equal(model(x), model[5].bias.expand(2, -1))


# -- switcher properties ------------------------------------------------------------------------------


def _mlp_switcher(arch: str = "rowwise", **kw):
    model = _model("mlp")
    specs = find_gates(model, "all", "neuron", _input(1))  # layers fc1 (300 units) and fc2 (100 units)
    readers = find_readers(model, specs, _input(1))
    return model, GateSet(model, specs, readers), build_switcher(specs, SwitcherConfig(arch=arch, **kw))


def test_readers_map_each_conv_channel_to_its_flattened_columns_of_the_next_linear():
    model = create_tnn("lenet5", 1, 10, 28)
    specs = find_gates(
        model, "all", "neuron", torch.zeros(1, 1, 28, 28)
    )  # conv1 (20 channels), conv2 (50 channels), fc1 (500 units)
    readers = find_readers(model, specs, torch.zeros(1, 1, 28, 28))
    assert [[name for name, _ in r] for r in readers] == [["conv2"], ["fc1"], ["fc2"]]
    _, idx = readers[1][0]
    assert idx.shape == (50, 16)  # 50 channels of 4x4 after pooling, flattened channel-major
    assert torch.equal(idx[7], torch.arange(7 * 16, 8 * 16))
    views = GateSet(model, specs, readers).views()
    torch.testing.assert_close(views[1].outgoing[7], model[7].weight[:, 7 * 16 : 8 * 16].reshape(-1))
    torch.testing.assert_close(views[0].outgoing[2], model[3].weight[:, 2].reshape(-1))


def test_a_residual_channel_is_read_by_every_layer_that_reads_the_stream():
    model = create_tnn("resnet18", 3, 10, 32)
    specs = find_gates(model, "all", "neuron", _input(1))
    readers = dict(zip([s.layer for s in specs], find_readers(model, specs, torch.zeros(1, 3, 32, 32))))
    # The stem, layer1.0.conv2 and layer1.1.conv2 write the 64-channel stream (one unit group, named
    # after the stem) that layer1's first convs and layer2.0 (conv1, shortcut) read.
    assert {n for n, _ in readers["conv1"]} == {
        "layer1.0.conv1",
        "layer1.1.conv1",
        "layer2.0.conv1",
        "layer2.0.downsample.0",
    }
    views = GateSet(model, specs).views()  # without readers: the incoming side only, and BN gains
    assert all(v.outgoing is None for v in views)
    assert views[0].gain.shape == (64, 2 * 3), "the gains of the three BatchNorms after the stream's writers"
    assert views[0].incoming.shape == (64, 3 * 9 + 64 * 9 * 2), "every writer's incoming weights side by side"


@pytest.mark.parametrize("name, channels_last", [("lenet5", False), ("lenet5", True), ("resnet18", True)])
def test_the_outgoing_rms_and_sample_read_from_the_readers_equal_those_of_the_gathered_rows(name, channels_last):
    channels = 1 if name == "lenet5" else 3
    model = create_tnn(name, channels, 10, side := 28 if name == "lenet5" else 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    specs = find_gates(model, "all", "neuron", torch.zeros(1, channels, side, side))
    readers = find_readers(model, specs, torch.zeros(1, channels, side, side))
    views, fresh_views = GateSet(model, specs, readers).views(), GateSet(model, specs, readers).views()
    assert all(v.has_outgoing for v in views)  # every gated unit here is read by a later layer
    for view, fresh in zip(views, fresh_views):  # `fresh` has gathered nothing: its rms and sample read the readers
        full = view.outgoing
        assert full.shape == (view.incoming.shape[0], view.fan_out)
        torch.testing.assert_close(fresh.outgoing_rms(), full.square().mean(dim=1).sqrt())
        positions = torch.linspace(0, view.fan_out - 1, 256).long()
        expected = full if view.fan_out <= 256 else full[:, positions]
        assert torch.equal(fresh.outgoing_sample(256), expected)


def test_a_units_factor_changes_when_only_its_outgoing_weights_change():
    model, gates, switcher = _mlp_switcher()
    _randomise(switcher, gates.views())
    with torch.no_grad():
        before = switcher(gates.views())[0]
        model[3].weight[:, 5].mul_(3.0)  # unit 5 of layer '1': only the weights reading it
        after = switcher(gates.views())[0]
    assert after[5] != before[5]


def test_rescaling_a_relu_units_incoming_by_c_and_outgoing_by_1_over_c_leaves_its_layers_factors():
    model, gates, switcher = _mlp_switcher()
    _randomise(switcher, gates.views())
    x = _input(4)
    with torch.no_grad():
        before, out_before = switcher(gates.views()), model(x)
        for i, c in ((5, 4.0), (17, 0.1)):
            model[1].weight[i].mul_(c)
            model[1].bias[i].mul_(c)
            model[3].weight[:, i].div_(c)
        after, out_after = switcher(gates.views()), model(x)
    torch.testing.assert_close(out_after, out_before, rtol=1e-4, atol=1e-5)  # the same function
    # Layer '1' (the rescaled units and their neighbours) is unchanged; layer '3' reads rescaled
    # inputs, and its rows change shape, so its factors may move.
    torch.testing.assert_close(after[0], before[0], rtol=1e-4, atol=1e-5)


def test_the_incoming_only_view_is_fooled_by_the_same_rescaling():
    model, gates, switcher = _mlp_switcher(describe="incoming")
    _randomise(switcher, gates.views())
    with torch.no_grad():
        before = switcher(gates.views())[0]
        model[1].weight[5].mul_(4.0)
        model[3].weight[:, 5].div_(4.0)
        after = switcher(gates.views())[0]
    assert after[5] != before[5]


@pytest.mark.parametrize("revive", [True, False])
def test_a_factor_at_zero_gets_the_task_gradient_only_when_revivable(revive):
    h = torch.tensor([-1.0, 0.5], requires_grad=True)
    f = revivable_relu(h) if revive else torch.relu(h)
    assert f.tolist() == [0.0, 0.5]
    f.sum().backward()
    assert h.grad.tolist() == ([1.0, 1.0] if revive else [0.0, 1.0])


@pytest.mark.parametrize("arch", ["rowwise", "graph", "unet"])
def test_a_fresh_switcher_starts_at_init_factor(arch):
    _, gates, switcher = _mlp_switcher(arch, width=8, init_factor=1.0)
    with torch.no_grad():
        factors = switcher(gates.views())
    for f in factors:
        assert float(f.mean()) == pytest.approx(1.0, abs=1e-4)
    if arch != "unet":
        assert all(bool((f == 1).all()) for f in factors)


def test_changing_one_neurons_weights_changes_its_factor():
    model, gates, switcher = _mlp_switcher()
    _randomise(switcher, gates.views())
    with torch.no_grad():
        before = switcher(gates.views())[0]
        assert torch.equal(switcher(gates.views())[0], before), "factors are not a function of the weights"
        assert before.unique().numel() > 1, "switcher output is constant; the test would prove nothing"
        i = int(before.argmax())
        model[1].weight[i].mul_(3.0)
        after = switcher(gates.views())[0]
    assert after[i] != before[i]


def test_permuting_neurons_permutes_their_factors():
    model, gates, switcher = _mlp_switcher()
    _randomise(switcher, gates.views())
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = switcher(gates.views())
        model[1].weight.copy_(model[1].weight[perm])  # the units move with both of their sides
        model[1].bias.copy_(model[1].bias[perm])
        model[3].weight.copy_(model[3].weight[:, perm])
        after = switcher(gates.views())
    assert before[0].unique().numel() > 1
    torch.testing.assert_close(after[0], before[0][perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["rowwise", "graph"])
def test_permuting_one_layer_s_units_permutes_its_factors_and_leaves_every_other_layer_s(arch):
    # Rows of at most 256 entries are described whole (longer ones from evenly spaced entries,
    # which a permutation moves): here every description is exact. Scores: the factors before the
    # final ReLU, which may zero a whole layer of a random switcher.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 10))
    example = torch.zeros(1, 20)
    specs = find_gates(model, "all", "neuron", example)
    gates = GateSet(model, specs, find_readers(model, specs, example))
    switcher = build_switcher(specs, SwitcherConfig(arch=arch, width=8))
    _randomise(switcher, gates.views())
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = switcher.scores(gates.views())
        model[0].weight.copy_(model[0].weight[perm])
        model[0].bias.copy_(model[0].bias[perm])
        model[2].weight.copy_(model[2].weight[:, perm])
        after = switcher.scores(gates.views())
    assert before[0].unique().numel() > 1 and before[1].unique().numel() > 1
    torch.testing.assert_close(after[0], before[0][perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[1], before[1], atol=1e-5, rtol=1e-5)


def _lenet5_switcher(arch: str):
    torch.manual_seed(0)
    model = create_tnn("lenet5", 1, 10, 28).eval()
    example = torch.zeros(1, 1, 28, 28)
    specs = find_gates(model, "all", "neuron", example)  # conv1 (20 channels), conv2 (50), fc1 (500)
    gates = GateSet(model, specs, find_readers(model, specs, example))
    switcher = build_switcher(specs, SwitcherConfig(arch=arch, width=8))
    _randomise(switcher, gates.views())
    return model, gates, switcher


@pytest.mark.parametrize("arch", ["rowwise", "graph"])
def test_only_the_graph_switcher_s_factors_depend_on_the_units_two_layers_away(arch):
    # Scores (before the final ReLU). conv1's incoming weights are no part of a conv2 channel's description (its incoming rows are
    # conv2's, its outgoing fc1's): only messages along conv1 -> conv2 carry them.
    model, gates, switcher = _lenet5_switcher(arch)
    with torch.no_grad():
        before = switcher.scores(gates.views())
        model.conv1.weight[:5].mul_(3.0)
        model.conv1.weight[5:10].mul_(0.2)
        after = switcher.scores(gates.views())
    assert before[1].unique().numel() > 1
    assert torch.equal(after[1], before[1]) == (arch == "rowwise")


def test_the_graph_switcher_s_edges_are_the_weight_norms_between_gated_units():
    model, gates, _ = _lenet5_switcher("graph")
    (p1, j1, a1), (p2, j2, a2) = edges(gates.views())
    assert (p1, j1, p2, j2) == (0, 1, 1, 2)  # conv1 -> conv2 -> fc1; fc2 (the classifier) is no node
    torch.testing.assert_close(a1, model.conv2.weight.detach().square().sum(dim=(2, 3)).sqrt())
    fc1 = model.fc1.weight.detach().view(500, 50, -1)  # conv2's channel c is fc1's inputs c*16 .. c*16+15
    torch.testing.assert_close(a2, fc1.square().sum(dim=2).sqrt())


def test_layers_with_identical_weights_get_identical_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 10))
    with torch.no_grad():
        model[2].weight.copy_(model[0].weight)
        model[2].bias.copy_(model[0].bias)
    specs = find_gates(model, "all", "neuron", torch.zeros(1, 20))
    assert [s.layer for s in specs] == ["0", "2"]
    switcher = build_switcher(specs, SwitcherConfig(arch="rowwise"))
    weights = GateSet(model, specs).views()
    _randomise(switcher, weights, seed=1)
    with torch.no_grad():
        first, second = switcher(weights)
    assert first.unique().numel() > 1, "switcher output is constant; the test would prove nothing"
    assert torch.equal(first, second)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_a_negative_head_bias_switches_every_unit_exactly_off(granularity):
    model = _model("lenet5")
    specs = find_gates(model, "all", granularity, _input(1))
    switcher = build_switcher(specs, SwitcherConfig(granularity=granularity, init_factor=-0.5))
    with torch.no_grad():
        factors = switcher(GateSet(model, specs).views())
    assert all(int(torch.count_nonzero(f)) == 0 for f in factors)


def test_check_factors_rejects_a_wrong_shape_and_a_wrong_count():
    _, gates, switcher = _mlp_switcher()
    good = [torch.ones(s.factor_shape) for s in gates.specs]
    check_factors(gates.specs, good)
    with pytest.raises(ValueError, match="expected"):
        check_factors(gates.specs, [torch.ones(299), good[1]])
    with pytest.raises(ValueError, match="expected 2 factor tensors"):
        check_factors(gates.specs, good[:1])
    with pytest.raises(ValueError):
        gates.set([good[0], torch.ones(100, 1)])


# -- schedule -----------------------------------------------------------------------------------------


def test_update_ratio_alternates_counted_from_the_end_of_warmup():
    alt = Alternation(update_ratio=3, warmup_epochs=1, steps_per_epoch=10)
    T, S = Phase.TNN, Phase.SNN
    assert [alt.phase_at(0, s) for s in range(10)] == [T] * 10
    assert not alt.gated(0) and alt.gated(1)
    pattern = [T, T, T, S] * 5
    assert [alt.phase_at(1, s) for s in range(10)] == pattern[:10]
    assert [alt.phase_at(2, s) for s in range(10)] == pattern[10:20]


def test_update_ratio_one_alternates_every_step():
    alt = Alternation(update_ratio=1, warmup_epochs=0, steps_per_epoch=3)
    got = [alt.phase_at(e, s) for e in range(2) for s in range(3)]
    assert got == [Phase.TNN, Phase.SNN] * 3


def test_epoch_mode_alternates_whole_epochs_tnn_first():
    alt = Alternation(update_ratio="epoch", warmup_epochs=2, steps_per_epoch=5)
    expected = {0: Phase.TNN, 1: Phase.TNN, 2: Phase.TNN, 3: Phase.SNN, 4: Phase.TNN, 5: Phase.SNN}
    for epoch, phase in expected.items():
        assert {alt.phase_at(epoch, s) for s in range(5)} == {phase}


def test_finetune_epochs_train_only_the_tnn_while_the_factors_act():
    alt = Alternation(update_ratio=1, warmup_epochs=1, steps_per_epoch=4, finetune_from=3)
    assert [alt.phase_at(2, s) for s in range(4)] == [Phase.TNN, Phase.SNN] * 2
    for epoch in (3, 4):
        assert alt.gated(epoch)
        assert {alt.phase_at(epoch, s) for s in range(4)} == {Phase.TNN}
