"""Baselines under the same engine: dense; magnitude pruning (Han et al. 2015, here per neuron:
lowest weight-norm units, the same fraction of each layer); network slimming (Liu et al. 2017: L1
on per-channel scales, one global ranking); and Torch-Pruning's own pruner (DepGraph, Fang et al.
2023: group-norm importance, one global ranking), as a peer check of ours. Each prunes once,
`prune.finetune_epochs` before the end, to the budget when one is set (`distswitch.cost.cut_to_budget`;
Torch-Pruning: its pruner's steps until the budget is met), then fine-tunes."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from distswitch.config import Config, ConfigError
from distswitch.cost import CostModel, scheduled_fraction
from distswitch.gates import GateSpec
from distswitch.methods.base import METHODS, FixedFactors, Method, budget_cost, keep_top, rank_fraction
from distswitch.unit_weights import UnitWeights


@METHODS.register("dense")
class Dense(Method):
    pass  # a budget does not apply: the dense network is the reference every budget is a fraction of


class _PruneOnce(Method):
    def __init__(
        self, cfg: Config, specs: list[GateSpec], steps_per_epoch: int, cost: CostModel | None, learnable: bool
    ) -> None:
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


@METHODS.register("torch-pruning")
class TorchPruning(Magnitude):
    """Torch-Pruning's MetaPruner with its group-norm importance (`GroupMagnitudeImportance(p=2)`,
    DepGraph's default) and global ranking, run on a copy of the TNN in small steps until the
    budget's cost is met (then the last-removed units that fit come back, as in our cut); the
    channels it removed become this run's masks, so the fine-tuning, the export and the counts are
    ours. Needs a budget; `prune.schedule: gradual` runs the pruner
    afresh at each cut of the ramp. Convolutional and FC unit groups only (no attention heads)."""

    STEPS = 200  # pruner steps (each ~0.5% of the channels) to 1 - budget.min_width

    def __init__(self, cfg: Config, specs: list[GateSpec], steps_per_epoch: int, cost: CostModel | None = None) -> None:
        if cfg.budget.fraction is None or cfg.switcher.granularity != "neuron":
            raise ConfigError("method: torch-pruning needs budget.fraction and switcher.granularity=neuron")
        if any(s.heads_of for s in specs):
            raise ConfigError("method: torch-pruning does not prune attention heads here; use magnitude")
        super().__init__(cfg, specs, steps_per_epoch, cost)
        self.network: tuple[nn.Module, Callable[[], nn.Module], torch.Tensor] | None = None

    def bind(self, tnn: nn.Module, fresh: Callable[[], nn.Module], example: torch.Tensor) -> None:
        self.network = (tnn, fresh, example)

    def masks(self, views, fraction):
        tnn, fresh, example = self.network
        model = fresh()  # ungated, on the CPU: the TNN's weights without its gates' hooks
        model.load_state_dict({k: v.detach().cpu() for k, v in tnn.state_dict().items()})
        modules = dict(model.named_modules())
        roots = {id(modules[name]): k for k, s in enumerate(self.specs) for name, _ in s.members}
        gated = set(roots)
        ignored = [m for m in modules.values() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in gated]
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=True,
            pruning_ratio=1 - self.cfg.budget.min_width,
            max_pruning_ratio=1 - self.cfg.budget.min_width,
            iterative_steps=self.STEPS,
            ignored_layers=ignored,
        )
        left = [list(range(s.units)) for s in self.specs]  # original indices still in each group
        removed: list[tuple[int, int]] = []  # (group, original index) in the pruner's order
        target = fraction * self.cost.dense
        for _ in range(self.STEPS):
            if self.cost.evaluate_list([len(x) for x in left]) <= target + 1e-9:
                break
            for group in pruner.step(interactive=True):
                item = next((i for i in group if id(i.dep.target.module) in roots and i.dep.handler in _OUT), None)
                if item is not None:  # positions in the pruned copy's layer: map them back to the originals
                    k, gone = roots[id(item.dep.target.module)], set(item.idxs)
                    removed += [(k, u) for i, u in enumerate(left[k]) if i in gone]
                    left[k] = [u for i, u in enumerate(left[k]) if i not in gone]
                group.prune()
        # The last step may remove a costly unit (a conv channel) and land well under the budget: the
        # units removed last (the pruner's most important among them) come back while they fit.
        for k, u in reversed(removed):
            counts = [len(x) + (j == k) for j, x in enumerate(left)]
            if self.cost.evaluate_list(counts) <= target + 1e-9:
                left[k].append(u)
        masks = []
        for s, kept, v in zip(self.specs, left, views):
            m = torch.zeros(s.units, device=v.incoming.device)
            m[kept] = 1.0
            masks.append(m)
        return masks


_OUT = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
