"""What a method decides; the alternation loop itself lives in `distswitch.engine`.

A method owns a *factor source*: an nn.Module mapping the gated layers' weights (`UnitWeights`) to
factors (the switcher; free scales for slimming; fixed masks for magnitude pruning) or None for a
dense network. Its parameters train in `source_phase` (SNN for the switcher, TNN for slimming).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from distswitch.config import Config
from distswitch.cost import CostModel, cut_to_budget, cut_to_widths
from distswitch.gates import GateSpec
from distswitch.registry import Registry
from distswitch.schedule import Phase
from distswitch.unit_weights import UnitWeights

MethodBuilder = Callable[[Config, list[GateSpec], int, "CostModel | None"], "Method"]
METHODS: Registry[MethodBuilder] = Registry("method", "method")


def build_method(cfg: Config, specs: list[GateSpec], steps_per_epoch: int, cost: CostModel | None = None) -> "Method":
    """`cost`: the cost model of `cfg.budget.kind`; methods that cut to a budget require it."""
    return METHODS.get(cfg.method)(cfg, specs, steps_per_epoch, cost)


def budget_cost(cfg: Config, cost: CostModel | None) -> CostModel | None:
    """The cost model a cutting method works with: None without a budget; required with one."""
    if cfg.budget.fraction is None:
        return None
    if cost is None:
        raise ValueError("a budget needs the model's cost model (distswitch.counting.exact_cost_model)")
    return cost


def min_units(cfg: Config, specs: list[GateSpec]) -> list[int]:
    """Fewest units each unit group keeps in a cut: budget.min_width of its width (rounded up), and
    switcher.min_kept, at least 1 (a layer needs a unit)."""
    return [
        min(s.units, max(1, cfg.switcher.min_kept, math.ceil(cfg.budget.min_width * s.units - 1e-9))) for s in specs
    ]


class Method:
    """Defaults describe dense training: TNN steps only, no factors."""

    source: nn.Module | None = None
    source_phase: Phase = Phase.TNN

    def __init__(self, cfg: Config, specs: list[GateSpec], steps_per_epoch: int, cost: CostModel | None = None) -> None:
        self.cfg, self.specs, self.steps_per_epoch, self.cost = cfg, specs, steps_per_epoch, cost

    def budget_cut(self, scores: list[torch.Tensor], fraction: float, final: bool = True) -> list[torch.Tensor]:
        """Masks meeting `fraction` of the budgeted cost, highest scores kept; the final cut keeps
        `budget.widths` per layer instead where they are given (the allocation diagnostic)."""
        widths = {str(k): v for k, v in (self.cfg.budget.widths or {}).items()}  # YAML: 1 is an int
        if final and widths:
            missing = sorted({s.layer for s in self.specs} - set(widths))
            if missing:
                raise ValueError(f"budget.widths: no width for gated layer(s) {', '.join(missing)}")
            return cut_to_widths(scores, [min(int(widths[s.layer]), s.units) for s in self.specs])
        return cut_to_budget(self.cost, scores, fraction, min_units(self.cfg, self.specs))

    def bind(self, tnn: nn.Module, fresh: Callable[[], nn.Module], example: torch.Tensor) -> None:
        """The network itself, for a method that needs more than its weights' views (Torch-Pruning's
        pruner): the gated TNN, a maker of fresh ungated copies of it, and an input example."""

    def phase_at(self, epoch: int, step: int) -> Phase:
        return Phase.TNN

    def gated(self, epoch: int) -> bool:
        """Whether the factors act on the network during `epoch`."""
        return False

    def penalty(self, factors: list[torch.Tensor], epoch: int) -> torch.Tensor | float:
        """Extra loss on the factors in steps of `source_phase` (0 for the papers' method)."""
        return 0.0

    def on_epoch_start(self, epoch: int, views: list[UnitWeights]) -> None:
        """Hook for one-off changes, e.g. the baselines' pruning step."""

    # Sparse learning (budget.sparse_learning): per layer, 1 for the units TNN steps shrink this
    # epoch; set from `on_epoch_start` (so a resumed epoch recomputes the same), None = none.
    shrink: list[torch.Tensor] | None = None

    def set_shrink(self, final_masks: list[torch.Tensor] | None) -> None:
        """Shrink the units outside `final_masks` (the final cut by the current scores; None: stop)."""
        self.shrink = [1 - m for m in final_masks] if final_masks is not None else None

    def weight_penalty(self, sq_norms: list[torch.Tensor | None]) -> torch.Tensor | float:
        """TNN steps' extra loss: `budget.sparse_learning` times the group norms of the units to shrink."""
        if self.shrink is None:
            return 0.0
        return self.cfg.budget.sparse_learning * sum(
            (t * (n + 1e-12).sqrt()).sum() for t, n in zip(self.shrink, sq_norms) if n is not None
        )

    def selectable(self, epoch: int) -> bool:
        """Whether the model after `epoch` may be chosen as the result (validation accuracy)."""
        return True


class FixedFactors(nn.Module):
    """Factors that ignore the weights: learnable scales (slimming) times a fixed 0/1 mask.

    Not a switcher: this is plain learned gating, used only by the baselines.
    """

    def __init__(self, specs: list[GateSpec], learnable: bool) -> None:
        super().__init__()
        self.scales = nn.ParameterList(nn.Parameter(torch.ones(s.factor_shape), requires_grad=learnable) for s in specs)
        for k, s in enumerate(specs):
            self.register_buffer(f"mask{k}", torch.ones(s.factor_shape))

    def masks(self) -> list[torch.Tensor]:
        return [getattr(self, f"mask{k}") for k in range(len(self.scales))]

    def set_masks(self, masks: list[torch.Tensor]) -> None:
        for mask, new in zip(self.masks(), masks):
            mask.copy_(new)

    def forward(self, views: list[UnitWeights]) -> list[torch.Tensor]:
        return [s * m for s, m in zip(self.scales, self.masks())]


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """0/1 mask keeping the `keep` highest scores (ties broken by index, so it is deterministic)."""
    mask = torch.zeros_like(scores)
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    mask.view(-1)[order[:keep]] = 1.0
    return mask


def rank_fraction(score: torch.Tensor) -> torch.Tensor:
    """Each unit's rank within its layer in (0, 1]: one global cut on it removes the same share of
    every layer (the per-layer allocation of classic magnitude pruning)."""
    ranks = torch.empty(score.numel())
    ranks[torch.argsort(score.flatten().cpu(), stable=True)] = torch.arange(1, score.numel() + 1, dtype=torch.float32)
    return (ranks / score.numel()).view_as(score)
