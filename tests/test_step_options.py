"""The step's speed options: train.precision (autocast, fp16 scaling), train.channels_last and
train.compile change how a step runs, never what it learns beyond floating-point rounding."""

from __future__ import annotations

import pytest
import torch

from conftest import FASHION_INFO, fake_batch, make_config
from distswitch.build import build
from distswitch.engine import Engine
from distswitch.schedule import Phase

CPU = torch.device("cpu")


def _engine(name: str = "lenet5", **train) -> Engine:
    cfg = make_config(
        model={"name": name}, method="switch", schedule={"warmup_epochs": 0}, train={"epochs": 2, **train}
    )
    torch.manual_seed(0)
    tnn, gates, meth = build(cfg, FASHION_INFO, 10, CPU)
    return Engine(cfg, tnn, gates, meth, CPU)


def _run(engine: Engine, phases: list[Phase], batch: int = 16) -> list[float]:
    return [float(engine.step(0, ph, *fake_batch(batch, seed=i))[0]) for i, ph in enumerate(phases)]


PHASES = [Phase.TNN, Phase.TNN, Phase.SNN, Phase.TNN]


def test_bf16_autocasts_the_tnn_while_weights_factors_and_losses_stay_fp32():
    fp32, bf16 = _engine(), _engine(precision="bf16")
    seen = []
    bf16.tnn[-1].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    ref, got = _run(fp32, PHASES), _run(bf16, PHASES)
    assert set(seen) == {torch.bfloat16}, "the TNN's layers did not run in bf16"
    assert all(p.dtype == torch.float32 for p in [*bf16.tnn.parameters(), *bf16.source.parameters()])
    assert all(f.dtype == torch.float32 for f in bf16.compute_factors(0))
    assert got != ref, "bf16 and fp32 steps gave bit-identical losses: autocast did not act"
    assert got == pytest.approx(ref, rel=0.03)  # bf16 keeps 8 bits of mantissa


def test_fp16_skips_a_step_whose_gradients_overflow_backs_off_and_checkpoints_its_scale():
    engine = _engine(precision="fp16")
    _run(engine, [Phase.TNN])
    scaler = engine.scalers[Phase.TNN]
    assert scaler.is_enabled() and engine.scalers[Phase.SNN].is_enabled()
    # A loss scale of 2^40 overflows fp16 activation gradients (max 65504): the step must not land.
    scaler.update(2.0**40)
    before = [p.detach().clone() for p in engine.tnn.parameters()]
    _run(engine, [Phase.TNN])
    assert all(torch.equal(a, p) for a, p in zip(before, engine.tnn.parameters())), "an overflowing step was applied"
    assert scaler.get_scale() == 2.0**39
    restored = _engine(precision="fp16")
    restored.load_state_dict(engine.state_dict())
    assert restored.scalers[Phase.TNN].get_scale() == 2.0**39


def test_channels_last_stores_conv_weights_nhwc_and_learns_what_contiguous_learns():
    plain, nhwc = _engine(channels_last=False), _engine()  # null (default) = on
    conv = nhwc.tnn[3].weight  # the second conv: with one input channel both layouts coincide
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert not plain.tnn[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert _run(nhwc, PHASES) == pytest.approx(_run(plain, PHASES), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["switcher", "all"])
def test_compiled_steps_give_the_eager_factors_and_losses(mode):
    from torch._dynamo.utils import counters  # dynamo's own tally of the graphs it compiled

    graphs = counters["stats"]["unique_graphs"]
    eager, compiled = _engine("mlp"), _engine("mlp", compile=mode)
    with torch.no_grad():
        for a, b in zip(eager.compute_factors(0), compiled.compute_factors(0)):
            torch.testing.assert_close(b, a)
    assert _run(compiled, PHASES) == pytest.approx(_run(eager, PHASES), rel=1e-4)
    for a, b in zip(eager.compute_factors(0), compiled.compute_factors(0)):  # after SNN learning too
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # The switcher runs in two graphs (TNN steps: no grad, eval; SNN steps); `all` adds the TNN's.
    assert counters["stats"]["unique_graphs"] - graphs >= (2 if mode == "switcher" else 4)
    # In place: checkpoints of compiled runs keep the plain keys.
    assert eager.state_dict()["source"].keys() == compiled.state_dict()["source"].keys()
    assert eager.state_dict()["tnn"].keys() == compiled.state_dict()["tnn"].keys()


@pytest.mark.parametrize("loader", ["ffcv", "torch"])
def test_loaders_hand_batches_in_the_precision_s_dtype_and_the_configured_layout(loader):
    from distswitch.data import make_loaders

    cfg = make_config(
        data={"dataset": "fashion-mnist", "loader": loader, "channels": 3, "image_size": 32, "train_limit": 256},
        train={"precision": "bf16", "channels_last": True, "batch_size": 64},
    )
    x, y = next(iter(make_loaders(cfg, 0, 1, CPU).train))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.bfloat16 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    default = make_config(data={"dataset": "fashion-mnist", "loader": loader, "train_limit": 256})
    x, _ = next(iter(make_loaders(default, 0, 1, CPU).train))
    assert x.dtype == torch.float32 and x.is_contiguous()
