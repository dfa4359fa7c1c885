"""A run's parts from its config: names checked, the device, the seed, the TNN with its gates and
method, the replica wrappers. Shared by the worker (which trains them) and the driver (which
builds them once on the CPU before a cluster starts, to fail in seconds)."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.distributed as dist

from distswitch.config import Config, ConfigError, channels_last_on
from distswitch.cost import CostModel
from distswitch.counting import exact_cost_model
from distswitch.coupling import dependency_graph, find_readers
from distswitch.data import DATASETS, DatasetInfo, check_data
from distswitch.gates import GateSet, GateSpec, find_gates
from distswitch.methods import METHODS, build_method
from distswitch.methods.base import min_units
from distswitch.models import MODELS, create_tnn
from distswitch.optim import OPTIMIZERS, SCHEDULERS
from distswitch.parallel import DDPReplicas, Replicas
from distswitch.switcher import SWITCHERS


def validate_names(cfg: Config) -> None:
    """Registry-backed names, checked before any work starts (raises UnknownNameError)."""
    MODELS.get(cfg.model.name)
    DATASETS.get(cfg.data.dataset)
    METHODS.get(cfg.method)
    SWITCHERS.get(cfg.switcher.arch)
    for phase in ("tnn", "snn"):
        section = getattr(cfg.optim, phase)
        OPTIMIZERS.get(section.name, f"optim.{phase}.name")
        SCHEDULERS.get(section.scheduler, f"optim.{phase}.scheduler")


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(cfg.train.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dense_tnn(cfg: Config, info: DatasetInfo) -> torch.nn.Module:
    """A fresh, ungated TNN of the run's model on the CPU (references, counts, twins)."""
    return create_tnn(cfg.model.name, info.channels, info.num_classes, info.image_size)


def build(cfg: Config, info: DatasetInfo, steps_per_epoch: int, device: torch.device, sync_batchnorm: bool = False):
    """TNN, its gates and the method (with its factor source), on `device`."""
    tnn = dense_tnn(cfg, info)
    if sync_batchnorm:  # before the gates: their hooks attach to the modules that will run
        tnn = torch.nn.SyncBatchNorm.convert_sync_batchnorm(tnn)
    tnn = tnn.to(device)
    if channels_last_on(cfg.train):
        tnn = tnn.to(memory_format=torch.channels_last)  # 4-d weights only
    example = torch.zeros(1, info.channels, info.image_size, info.image_size)
    plain = dense_tnn(cfg, info)  # same names, on CPU: the graph is traced once, here
    graph = dependency_graph(plain, example)
    specs = find_gates(plain, cfg.model.gated, cfg.switcher.granularity, example, graph)
    gates = GateSet(tnn, specs, find_readers(plain, specs, example, graph))
    method = build_method(cfg, specs, steps_per_epoch, budget_cost_model(cfg, plain, specs, example, graph))
    method.bind(tnn, lambda: dense_tnn(cfg, info), example)
    smallest = min(specs, key=lambda spec: spec.units, default=None)
    if method.source is not None and smallest is not None and cfg.switcher.min_kept > smallest.units:
        raise ConfigError(
            f"switcher.min_kept: got {cfg.switcher.min_kept}; layer {smallest.layer} has only "
            f"{smallest.units} units; use at most {smallest.units}"
        )
    if method.source is not None:
        method.source.to(device)
    return tnn, gates, method


def budget_cost_model(
    cfg: Config, model: torch.nn.Module, specs: list[GateSpec], example: torch.Tensor, graph=None
) -> CostModel | None:
    """The cost model of `budget.kind` (None without a budget); a budget no cut can meet is refused."""
    b = cfg.budget
    if b.fraction is None or cfg.method == "dense":
        return None
    cost = exact_cost_model(model, specs, example, b.kind, graph)
    floor = cost.floor(min_units(cfg, specs)) / cost.dense
    if floor > b.fraction + 0.01:
        raise ConfigError(
            f"budget.fraction: {b.fraction} of the dense {b.kind} cannot be met by {cfg.model.name}: "
            f"keeping budget.min_width={b.min_width} of each unit group (at least switcher.min_kept="
            f"{max(1, cfg.switcher.min_kept)}) already costs {floor:.3f}; use budget.fraction >= "
            f"{math.ceil(floor * 1000) / 1000:.3f} or a smaller budget.min_width"
        )
    return cost


def preflight(cfg: Config) -> None:
    """What only fails once data is loaded (missing data, a batch larger than the split, gates that
    select nothing), checked in this process on CPU: seconds instead of a cluster start-up."""
    validate_names(cfg)
    info, steps = check_data(cfg, cfg.distributed.max_workers)
    build(cfg, info, steps, torch.device("cpu"))


def make_replicas(tnn: torch.nn.Module, method, device: torch.device) -> Replicas:
    """DDP replicas when a process group of several workers exists. One worker has nothing to
    all-reduce: the plain modules skip DDP's per-step bucket bookkeeping and buffer broadcasts."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DDPReplicas(tnn, method.source, method.source_phase, device)
    return Replicas(tnn, method.source)
