"""Optimisers and learning-rate schedules by name (`optim.tnn` / `optim.snn`), in the same kind of
registry as models, datasets, switchers and methods: a new one is a registered builder, not a branch.

Schedules are stepped once per epoch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from distswitch.config import OptimizerConfig
from distswitch.registry import Registry

OptimizerBuilder = Callable[[list[nn.Parameter], OptimizerConfig], torch.optim.Optimizer]
SchedulerBuilder = Callable[[torch.optim.Optimizer, OptimizerConfig, int], torch.optim.lr_scheduler.LRScheduler]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer", "optim.<tnn|snn>.name")
SCHEDULERS: Registry[SchedulerBuilder] = Registry("scheduler", "optim.<tnn|snn>.scheduler")


@OPTIMIZERS.register("sgd")
def _sgd(params: list[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )


@OPTIMIZERS.register("adam")
def _adam(params: list[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(params: list[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@SCHEDULERS.register("cosine")
def _cosine(opt: torch.optim.Optimizer, cfg: OptimizerConfig, epochs: int):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))


@SCHEDULERS.register("multistep")
def _multistep(opt: torch.optim.Optimizer, cfg: OptimizerConfig, epochs: int):
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)


@SCHEDULERS.register("constant")
def _constant(opt: torch.optim.Optimizer, cfg: OptimizerConfig, epochs: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def build_optimizer(params: list[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.name)(params, cfg)


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimizerConfig, epochs: int):
    return SCHEDULERS.get(cfg.scheduler)(opt, cfg, epochs)
