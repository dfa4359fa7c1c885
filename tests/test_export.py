"""The compact model: same outputs as the gated model, fewer parameters, a pickle-free file."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from distswitch.counting import count
from distswitch.export import architecture, compact_model, load_compact, save_compact
from distswitch.gates import GateSet, find_gates
from distswitch.models import create_tnn, list_models

TOLERANCE = 1e-4  # the package's own export check (run.EXPORT_TOLERANCE)


def _gated(name: str, gated: str = "all", granularity: str = "neuron", size: int = 32):
    """A model with non-trivial BatchNorm statistics, in eval mode, its gates, and a hook-free copy."""
    torch.manual_seed(0)
    model = create_tnn(name, 3, 10, size)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size) * 2 + 0.5)
    model.eval()
    plain = create_tnn(name, 3, 10, size)
    plain.load_state_dict(model.state_dict())
    specs = find_gates(model, gated, granularity, torch.zeros(1, 3, size, size))
    return model, GateSet(model, specs), plain


def _random_factors(specs, seed: int = 0, zero_prob: float = 0.4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.rand(s.factor_shape, generator=gen) * 2 * (torch.rand(s.factor_shape, generator=gen) >= zero_prob)
        for s in specs
    ]


def _inputs(size: int = 32) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(7))


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _params(model: nn.Module) -> int:
    return count(model, _inputs()[:1])["params"]


@pytest.mark.parametrize("name", list_models())
def test_compact_model_matches_the_gated_model_and_is_smaller(name, tmp_path):
    model, gates, plain = _gated(name)
    factors = _random_factors(gates.specs)
    gates.set(factors)
    x = _inputs()
    reference = _outputs(model, x)
    dense_params = _params(plain)

    plan = compact_model(plain, gates.specs, factors, x[:1])
    compact_out = _outputs(plain, x)
    assert _max_diff(compact_out, reference) <= TOLERANCE
    assert plan, "nothing was removed"
    assert _params(plain) < dense_params

    path = tmp_path / "model.pt"
    save_compact(path, architecture(name, 3, 10, 32, plan, plain), plain)
    bundle = torch.load(path, weights_only=True)  # no pickled classes of ours
    assert json.loads(bundle["arch"])["plan"] == plan
    assert json.loads(path.with_suffix(".arch.json").read_text())["model"] == name
    loaded = load_compact(path)
    assert torch.equal(_outputs(loaded, x), compact_out)
    assert _params(loaded) == _params(plain)


def test_compact_model_without_factors_is_the_dense_model():
    model, gates, plain = _gated("lenet5")
    x = _inputs()
    assert compact_model(plain, gates.specs, None, x[:1]) == []
    assert torch.equal(_outputs(plain, x), _outputs(model, x))


def test_classifier_input_gates_compact_exactly():
    model, gates, plain = _gated("lenet5", gated="classifier")
    factors = _random_factors(gates.specs, seed=1)
    gates.set(factors)
    x = _inputs()
    reference, dense_params = _outputs(model, x), _params(plain)
    plan = compact_model(plain, gates.specs, factors, x[:1])
    assert _max_diff(_outputs(plain, x), reference) <= TOLERANCE
    removed = len(plan[0]["idxs"])
    assert removed == int((factors[0] == 0).sum())
    # Each removed feature is one FC neuron (50 x 5 x 5 weights at 32x32, + bias) and one
    # classifier column (10 weights).
    assert dense_params - _params(plain) == removed * (1250 + 1 + 10)


def test_connection_gates_fold_into_the_weights_exactly():
    model, gates, plain = _gated("mlp", granularity="connection")
    factors = _random_factors(gates.specs, seed=2)
    gates.set(factors)
    x = _inputs()
    reference = _outputs(model, x)
    assert compact_model(plain, gates.specs, factors, x[:1]) == []  # unstructured: shapes stay
    assert _max_diff(_outputs(plain, x), reference) <= TOLERANCE
    stats = count(plain, x[:1])
    assert stats["nonzero_params"] < stats["params"]
    for spec, f in zip(gates.specs, factors):
        weight = dict(plain.named_modules())[spec.layer].weight
        assert bool((weight[f == 0] == 0).all())


def _resnet_with_zero_stream_channel(writers: list[str], channel: int = 5):
    """resnet18 with factor 0 for one channel of layer1's residual stream in the given layers only."""
    model, gates, plain = _gated("resnet18")
    factors = [torch.ones(s.factor_shape) for s in gates.specs]
    for k, spec in enumerate(gates.specs):
        if spec.layer in writers:
            factors[k][channel] = 0.0
    gates.set(factors)
    return model, gates, plain, factors


# The layers writing layer1's 64-channel residual stream: the stem and both blocks' second convs.
STREAM_WRITERS = ["conv1", "layer1.0.conv2", "layer1.1.conv2"]


def test_a_residual_channel_zero_in_one_writer_is_kept():
    model, gates, plain, factors = _resnet_with_zero_stream_channel(["layer1.0.conv2"])
    x = _inputs()
    reference, dense_params = _outputs(model, x), _params(plain)
    compact_model(plain, gates.specs, factors, x[:1])
    assert _max_diff(_outputs(plain, x), reference) <= TOLERANCE
    assert _params(plain) == dense_params


def test_a_residual_channel_zero_in_every_writer_is_removed():
    model, gates, plain, factors = _resnet_with_zero_stream_channel(STREAM_WRITERS)
    x = _inputs()
    reference, dense_params = _outputs(model, x), _params(plain)
    compact_model(plain, gates.specs, factors, x[:1])
    assert _max_diff(_outputs(plain, x), reference) <= TOLERANCE
    # One channel of the stream: 3 writers' conv filters (27 + 576 + 576) and BN pairs (3 x 2),
    # 2 blocks' conv1 inputs (2 x 576), layer2.0's conv1 (128 x 9) and downsample (128) inputs.
    assert dense_params - _params(plain) == 27 + 576 + 576 + 6 + 2 * 576 + 128 * 9 + 128


def test_a_conv_layer_switched_off_entirely_still_exports():
    model, gates, plain = _gated("lenet5")
    factors = [torch.ones(s.factor_shape) for s in gates.specs]
    factors[0].zero_()  # every channel of the first conv off: the network outputs a constant
    gates.set(factors)
    x = _inputs()
    reference = _outputs(model, x)
    compact_model(plain, gates.specs, factors, x[:1])
    assert _max_diff(_outputs(plain, x), reference) <= TOLERANCE


def test_the_run_s_export_check_compares_cpu_copies_not_the_training_device_s_tnn(tmp_path):
    """On a GPU the TNN's convolutions run in TF32 (~5e-4 relative), the compact model on the CPU in
    fp32: a check between the two fails for a ResNet. The engine's TNN here rounds its outputs the
    way another device's kernels would (1e-3 off, 10x the tolerance); the export must not see it."""
    from conftest import make_config
    from distswitch.artifacts import export_compact
    from distswitch.build import build
    from distswitch.data import DatasetInfo
    from distswitch.engine import Engine

    info = DatasetInfo("cifar10", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, "none")
    cfg = make_config(model={"name": "resnet18"}, method="switch", schedule={"warmup_epochs": 0})
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    tnn, gates, method = build(cfg, info, 10, cpu)
    engine = Engine(cfg, tnn, gates, method, cpu)
    with torch.no_grad():  # factors that differ by unit, half of them 0: the export removes units
        head = method.source.neuron_head
        torch.nn.init.normal_(head.weight)
        pre = torch.cat([head(method.source.body(d)).flatten() for d in method.source.describe(gates.views())])
        head.bias.copy_(head.bias - pre.median())
    engine.tnn.register_forward_hook(lambda module, inputs, out: out + 1e-3)
    report = export_compact(cfg, info, engine, 0, _inputs(), tmp_path / "model.pt")
    assert report["export_max_abs_diff"] <= TOLERANCE
    assert report["compact"]["params"] < report["dense"]["params"]


def test_a_compact_model_loads_inside_torch_no_grad(tmp_path):
    """Torch-Pruning's graph traces through autograd; a caller's no_grad must not break loading."""
    torch.manual_seed(0)
    model = create_tnn("lenet5", 1, 10, 28)
    specs = find_gates(model, "all", "neuron", torch.zeros(1, 1, 28, 28))
    factors = [(torch.arange(s.units) % 2).float() for s in specs]
    example = torch.zeros(1, 1, 28, 28)
    plan = compact_model(model, specs, factors, example)
    assert plan
    save_compact(tmp_path / "model.pt", architecture("lenet5", 1, 10, 28, plan, model), model)
    with torch.no_grad():
        loaded = load_compact(tmp_path / "model.pt")
        torch.testing.assert_close(loaded(example), model(example))


def test_the_small_models_name_their_layers():
    assert [
        n for n, m in create_tnn("lenet5", 1, 10, 28).named_children() if isinstance(m, (nn.Conv2d, nn.Linear))
    ] == ["conv1", "conv2", "fc1", "fc2"]
    assert [s.layer for s in find_gates(create_tnn("mlp", 1, 10, 28), "all", "neuron", torch.zeros(1, 1, 28, 28))] == [
        "fc1",
        "fc2",
    ]


def test_an_attention_head_is_removed_as_its_query_key_value_rows_and_projection_columns():
    model, gates, plain = _gated("vit_tiny")
    specs = gates.specs
    heads = specs[0]  # blocks.0's three heads of 64
    assert (heads.heads_of, heads.units, heads.rows) == ("blocks.0.attn", 3, 64)
    factors = [torch.tensor([0.7, 0.0, 1.3]) if s is heads else torch.rand(s.units) + 0.5 for s in specs]
    gates.set(factors)
    x = _inputs()
    expected = _outputs(model, x)
    plan = compact_model(plain, specs, factors, x[:1])
    assert {"layer": "blocks.0.attn", "dim": "heads", "idxs": [1]} in plan
    attn = dict(plain.named_modules())["blocks.0.attn"]
    assert (attn.heads, attn.q.out_features, attn.v.out_features, attn.proj.in_features) == (2, 128, 128, 128)
    assert _max_diff(_outputs(plain, x), expected) <= TOLERANCE
