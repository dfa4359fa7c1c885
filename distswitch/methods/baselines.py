"""Baselines under the same engine: dense; magnitude pruning (Han et al. 2015, here per neuron:
lowest weight-norm units, the same fraction of each layer); network slimming (Liu et al. 2017: L1
on per-channel scales, one global ranking). Both prune once, `prune.finetune_epochs` before the end,
to the budget when one is set (`distswitch.cost.cut_to_budget`), then fine-tune."""

from __future__ import annotations

import math

import torch

from distswitch.config import Config
from distswitch.cost import CostModel, scheduled_fraction
from distswitch.gates import GateSpec, UnitWeights
from distswitch.methods.base import METHODS, FixedFactors, Method, budget_cost, keep_top, rank_fraction


@METHODS.register("dense")
class Dense(Method):
    pass  # a budget does not apply: the dense network is the reference every budget is a fraction of


class _PruneOnce(Method):
    def __init__(self, cfg: Config, specs: list[GateSpec], steps_per_epoch: int, cost: CostModel | None,
                 learnable: bool) -> None:
        super().__init__(cfg, specs, steps_per_epoch, budget_cost(cfg, cost))
        cost = self.cost
        self.source = FixedFactors(specs, learnable)
        self.prune_epoch = cfg.train.epochs - cfg.prune.finetune_epochs
        self.kept_fraction = cfg.prune.kept_fraction if cfg.prune.kept_fraction is not None else 0.5

        # Gradual (with a budget): a cut at every epoch from the warm-up's end to the prune epoch,
        # the switcher's ramp; the cuts before the prune epoch act on the network as they are made.
        self.gradual = cfg.prune.schedule == "gradual" and cost is not None
        self.first_cut = cfg.schedule.warmup_epochs + 1 if self.gradual else self.prune_epoch  # the switcher's epochs

    def on_epoch_start(self, epoch: int, views: list[UnitWeights]) -> None:
        target = self.cfg.budget.fraction
        if self.first_cut <= epoch <= self.prune_epoch:
            fraction = scheduled_fraction(target, epoch, self.first_cut, self.prune_epoch) if self.gradual else target
            self.source.set_masks(self.masks(views, fraction))
        if self.cfg.budget.sparse_learning > 0:  # the switcher's epochs: from its first cut to the last
            shrinking = self.cfg.schedule.warmup_epochs + 1 <= epoch < self.prune_epoch
            self.set_shrink(self.masks(views, target) if shrinking else None)  # the final cut by today's scores

    def masks(self, views: list[UnitWeights], fraction: float | None) -> list[torch.Tensor]:
        """The cut to `fraction` of the budget's cost (None: no budget, prune.kept_fraction of the units)."""
        raise NotImplementedError

    def cut(self, scores: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
        return self.budget_cut(scores, fraction, final=fraction == self.cfg.budget.fraction)

    def selectable(self, epoch: int) -> bool:
        return epoch >= self.prune_epoch


def _count(fraction: float, n: int) -> int:
    """ceil(fraction * n), at least 1; rounded first so 0.55 * 100 keeps 55, not 56."""
    return max(1, math.ceil(round(fraction * n, 6)))


def _importance(spec: GateSpec, view: UnitWeights, kind: str) -> torch.Tensor:
    """Per connection |w|; per unit the L2 norm of its incoming row (`incoming`), or of everything
    removing it removes (`group`: every writer's incoming weights, the BatchNorm scales and shifts
    after them, and its outgoing weights in every reader -- Torch-Pruning's group norm)."""
    w = view.incoming.detach()
    if spec.side == "weight":
        return w.abs()
    sq = w.square().sum(dim=1)
    if kind == "group":
        if view.gain is not None:
            sq = sq + view.gain.detach().square().sum(dim=1)
        if view.has_outgoing:
            sq = sq + view.outgoing_rms().square() * view.fan_out
    return sq.sqrt()


@METHODS.register("magnitude")
class Magnitude(_PruneOnce):
    def __init__(self, cfg: Config, specs: list[GateSpec], steps_per_epoch: int, cost: CostModel | None = None) -> None:
        super().__init__(cfg, specs, steps_per_epoch, cost, learnable=False)

    def gated(self, epoch: int) -> bool:
        return epoch >= self.first_cut

    def masks(self, views, fraction):
        scores = [_importance(spec, v, self.cfg.prune.importance) for spec, v in zip(self.specs, views)]
        if self.cost is not None:
            return self.cut([rank_fraction(s) for s in scores], fraction)
        return [keep_top(s, _count(self.kept_fraction, s.numel())) for s in scores]


@METHODS.register("slimming")
class Slimming(_PruneOnce):
    def __init__(self, cfg: Config, specs: list[GateSpec], steps_per_epoch: int, cost: CostModel | None = None) -> None:
        super().__init__(cfg, specs, steps_per_epoch, cost, learnable=True)

    def gated(self, epoch: int) -> bool:
        return True  # the scales act from the start; that is what the L1 term sparsifies

    def penalty(self, factors, epoch):
        if epoch >= self.prune_epoch or self.cfg.prune.l1 == 0:
            return 0.0
        return self.cfg.prune.l1 * sum(f.abs().sum() for f in factors)

    def masks(self, views, fraction):
        # One global threshold on |scale| (Liu et al.), but every layer keeps at least one unit.
        scales = [s.detach().abs() for s in self.source.scales]
        if self.cost is not None:
            return self.cut(scales, fraction)
        flat = torch.cat([s.flatten() for s in scales])
        keep = _count(self.kept_fraction, flat.numel())
        global_mask = keep_top(flat, keep)
        out, start = [], 0
        for s in scales:
            m = global_mask[start : start + s.numel()].view_as(s)
            start += s.numel()
            if m.sum() == 0:
                m = keep_top(s, 1)
            out.append(m)
        return out
