"""Replicas under a real gloo process group, without Ray: workers agree on a stop, and one worker
trains without DDP's wrapper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import FASHION_INFO, make_config
from distswitch.build import build, make_replicas
from distswitch.engine import Engine
from distswitch.gates import kept_report
from distswitch.parallel import DDPReplicas
from distswitch.schedule import Phase
from distswitch.stop import TrainingStopped

CPU = torch.device("cpu")


def _engine() -> Engine:
    cfg = make_config(model={"name": "mlp"}, method="switch", schedule={"warmup_epochs": 0})
    torch.manual_seed(0)
    tnn, gates, method = build(cfg, FASHION_INFO, 10, CPU)
    return Engine(cfg, tnn, gates, method, CPU, make_replicas(tnn, method, CPU))


def _one_dark_replica(rank: int, world: int, tmp: str) -> None:
    """Rank 1's switcher alone switches every unit off; each rank writes what its check decided."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        engine = _engine()  # DDP's constructor made the replicas equal: they diverge after it
        assert isinstance(engine.replicas, DDPReplicas)
        if rank == 1:
            with torch.no_grad():
                engine.source.neuron_head.bias.fill_(-1.0)
        kept = kept_report(engine.gates.specs, engine.compute_factors(0))
        try:
            engine._check_kept(0, kept)
            outcome = "went on"
        except TrainingStopped as exc:
            outcome = f"stopped: {exc}"
        Path(tmp, f"rank{rank}.txt").write_text(outcome)
        dist.barrier()  # both ranks done before either tears gloo down (pytorch/pytorch#75097: a hang)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)  # a rank stuck in teardown fails the test instead of stalling the suite
def test_a_layer_dark_on_one_worker_stops_every_worker_with_the_same_message(tmp_path):
    # A worker that went on alone would wait in its next collective for ever (with NCCL: a hang).
    mp.start_processes(_one_dark_replica, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert outcomes[0].startswith("stopped: the switcher kept fewer than switcher.min_kept=1 units"), outcomes[0]
    assert outcomes[0] == outcomes[1]


def test_one_worker_trains_its_modules_without_a_ddp_wrapper(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        engine = _engine()
        assert not isinstance(engine.replicas, DDPReplicas)
        assert engine.replicas.world_size == 1 and engine.replicas.gather("x") == ["x"]
    finally:
        dist.destroy_process_group()


def _uneven_steps(rank: int, world: int, tmp: str) -> None:
    """Two TNN steps on this rank's share of two fixed global batches of 64 (3 ranks: 22+21+21)."""
    from distswitch.data.datasets import batch_share

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        engine = _lenet5(batch_size=64)
        part = batch_share(64, rank, world)
        engine.loss_weight = (part.stop - part.start) * world / 64
        for x, y in _global_batches():
            engine.step(0, Phase.TNN, x[part], y[part])
        if rank == 0:
            torch.save(engine.tnn.state_dict(), Path(tmp) / "uneven.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _lenet5(batch_size: int) -> Engine:
    # LeNet5 has no BatchNorm: workers' shares give exactly the whole batch's mean gradient.
    cfg = make_config(model={"name": "lenet5"}, method="dense", train={"batch_size": batch_size})
    torch.manual_seed(0)
    tnn, gates, method = build(cfg, FASHION_INFO, 10, CPU)
    return Engine(cfg, tnn, gates, method, CPU, make_replicas(tnn, method, CPU))


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)) for _ in range(2)]


@pytest.mark.timeout(300)
def test_three_workers_with_uneven_shares_of_the_global_batch_update_like_one_worker_with_all_of_it(tmp_path):
    # 64 examples over 3 workers (an elastic group can have any size): 22 + 21 + 21, each loss
    # weighted by its share, so DDP's average is the global batch's mean.
    mp.start_processes(_uneven_steps, args=(3, str(tmp_path)), nprocs=3, start_method="spawn")
    whole = _lenet5(batch_size=64)
    for x, y in _global_batches():
        whole.step(0, Phase.TNN, x, y)
    uneven = torch.load(tmp_path / "uneven.pt", weights_only=True)
    for key, value in whole.tnn.state_dict().items():
        assert torch.allclose(uneven[key], value, atol=1e-6, rtol=1e-5), key
