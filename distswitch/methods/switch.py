"""The switcher method: TNN and SNN trained alternately on the task loss.

Without a budget it is the papers' method (plus the optional L1 term). With `budget.fraction`:

- Training moves toward the budget gradually: at the start of each switching epoch the factors
  are cut to that epoch's budget (a cubic ramp from 1 down to `budget.fraction`, reached in the
  last switching epoch; `distswitch.cost.scheduled_fraction`), lowest factors off first. The mask
  is re-derived from the current factors every epoch, so a unit cut early can come back, and the
  masked factors still get the task loss's gradient (straight through), so the switcher learns
  what turning a unit back on would gain.
- SNN steps add `switcher.l1` times each factor weighted by its unit's marginal share of the
  budgeted cost: a conv channel carrying 4% of the MACs is pushed harder than an FC unit
  carrying 0.03%. Evaluated on the device from the exact cost polynomial (no host sync).
- When fine-tuning starts, the factors are cut to the exact budget once more and frozen; the TNN
  fine-tunes under them, so the exported compact model meets the budget.
"""

from __future__ import annotations

import torch
from torch import nn

from distswitch.config import Config
from distswitch.cost import CostModel, kept_counts, scheduled_fraction
from distswitch.gates import GateSpec
from distswitch.methods.base import METHODS, Method, budget_cost, rank_fraction
from distswitch.schedule import Alternation, Phase
from distswitch.switcher import build_switcher
from distswitch.unit_weights import UnitWeights


class BudgetedSwitcher(nn.Module):
    """The switcher under the budget's current mask, or the factors frozen at the final cut. Masks
    and frozen factors are buffers, so a checkpoint holds them."""

    def __init__(self, switcher: nn.Module, specs: list[GateSpec], hard: bool = False) -> None:
        super().__init__()
        self.switcher = switcher
        self.hard = hard  # switcher.gate: hard
        for k, s in enumerate(specs):
            self.register_buffer(f"mask{k}", torch.ones(s.factor_shape))
            self.register_buffer(f"frozen{k}", torch.zeros(s.factor_shape))
        self.register_buffer("cut", torch.zeros((), dtype=torch.bool))
        self.count = len(specs)
        # The Python copy of `cut` that forward reads (reading the buffer every step would sync the
        # host): set by the method at each epoch's start and from a loaded state (an export of a
        # checkpoint computes factors without starting an epoch).
        self.is_cut = False

    def set_cut(self, cut: bool) -> None:
        self.is_cut = cut
        self.cut.fill_(cut)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.is_cut = bool(self.cut)

    def masks(self) -> list[torch.Tensor]:
        return [getattr(self, f"mask{k}") for k in range(self.count)]

    def frozen(self) -> list[torch.Tensor]:
        return [getattr(self, f"frozen{k}") for k in range(self.count)]

    def forward(self, views: list[UnitWeights]) -> list[torch.Tensor]:
        if self.is_cut:
            return self.frozen()
        if self.hard and not torch.is_grad_enabled():  # TNN steps, evaluation: the mask is all they see
            return self.masks()
        if self.hard:  # value m, gradient as if the value were f: a 0/1 gate that still teaches the factors
            return [m + (f - f.detach()) for f, m in zip(self.switcher(views), self.masks())]
        # Value f * m; gradient as if unmasked: a masked unit's factor still learns what it would gain.
        return [f * m + (f - f.detach()) * (1 - m) for f, m in zip(self.switcher(views), self.masks())]


class OnOffSwitcher(nn.Module):
    """`switcher.gate: hard` without a budget: a unit is on (1) where its factor is > 0 and off (0)
    where the ReLU zeroes it, the factors' gradient passed straight through."""

    def __init__(self, switcher: nn.Module) -> None:
        super().__init__()
        self.switcher = switcher

    def forward(self, views: list[UnitWeights]) -> list[torch.Tensor]:
        return [(f > 0).to(f.dtype) + (f - f.detach()) for f in self.switcher(views)]


@METHODS.register("switch")
class Switch(Method):
    source_phase = Phase.SNN

    def __init__(self, cfg: Config, specs: list[GateSpec], steps_per_epoch: int, cost: CostModel | None = None) -> None:
        super().__init__(cfg, specs, steps_per_epoch, budget_cost(cfg, cost))
        switcher = build_switcher(specs, cfg.switcher)
        self.budgeted = cfg.budget.fraction is not None
        hard = cfg.switcher.gate == "hard"
        if self.budgeted:
            self.source = BudgetedSwitcher(switcher, specs, hard)
        else:
            self.source = OnOffSwitcher(switcher) if hard else switcher
        if self.budgeted and cfg.switcher.ties == "score" and not hasattr(switcher, "scores"):
            raise ValueError(
                f"switcher.ties=score: switcher.arch={cfg.switcher.arch} has no scores(views) "
                "(its factors before the final ReLU); set switcher.ties=index"
            )
        self.cut_epoch = cfg.train.epochs - cfg.schedule.finetune_epochs
        self.alternation = Alternation(
            cfg.schedule.update_ratio, cfg.schedule.warmup_epochs, steps_per_epoch, finetune_from=self.cut_epoch
        )
        self._coeffs = None  # the cost polynomial on the factors' device, made at first use

    def phase_at(self, epoch: int, step: int) -> Phase:
        return self.alternation.phase_at(epoch, step)

    def gated(self, epoch: int) -> bool:
        return self.alternation.gated(epoch)

    def penalty(self, factors: list[torch.Tensor], epoch: int):
        if self.budgeted:
            return self._budget_penalty(factors)
        sw = self.cfg.switcher
        if sw.l1 == 0:
            return 0.0
        flat = torch.cat([f.flatten() for f in factors])
        # Mean factor over all units: the coefficient does not scale with network size.
        penalty = sw.l1 * flat.mean()
        if sw.target_kept is None:
            return penalty
        # Decided on the device (reading the count would stall every SNN step on a GPU). Counts are
        # compared in float64, not a float32 mean: 240/400 in float32 is 0.60000002 > 0.6.
        above = (flat != 0).sum(dtype=torch.float64) > sw.target_kept * flat.numel()
        return torch.where(above, penalty, 0.0)

    def _budget_penalty(self, factors: list[torch.Tensor]):
        if self.cfg.switcher.l1 == 0:
            return 0.0
        if self._coeffs is None:
            self._coeffs = self.cost.tensors(factors[0].device)
        dense = float(self.cost.dense)
        share = (CostModel.marginal(self._coeffs, kept_counts(factors)) / dense).float()
        return self.cfg.switcher.l1 * sum(w * f.sum() for w, f in zip(share, factors))

    def on_epoch_start(self, epoch: int, views: list[UnitWeights]) -> None:
        if not self.budgeted:
            return
        # The first switching epoch is not cut: a fresh switcher gives every unit the same factor,
        # and ties would be cut by index. The gradual baselines cut on the same epochs.
        start = self.cfg.schedule.warmup_epochs + 1
        shrinking = self.cfg.budget.sparse_learning > 0 and start <= epoch < self.cut_epoch
        if start <= epoch <= self.cut_epoch:
            scores = self._scores(views)  # one pass serves the cut and sparse learning
            self._cut(
                scores,
                scheduled_fraction(self.cfg.budget.fraction, epoch, start, self.cut_epoch),
                final=epoch == self.cut_epoch,
            )
        if self.cfg.budget.sparse_learning > 0:  # (the first cut's epoch on: the scores mean something)
            self.set_shrink(self.budget_cut(scores, self.cfg.budget.fraction) if shrinking else None)
        self.source.set_cut(epoch >= self.cut_epoch)  # a resumed run gets the frozen factors from its checkpoint

    @torch.no_grad()
    def _scores(self, views: list[UnitWeights]) -> list[torch.Tensor]:
        """What the cut orders units by: the factors, or their scores before the ReLU (the same
        order where factors are > 0; tied zeros ordered too)."""
        if self.cfg.switcher.ties == "score":
            return self.source.switcher.scores(views)
        return self.source.switcher(views)

    @torch.no_grad()
    def _cut(self, scores: list[torch.Tensor], fraction: float, final: bool) -> None:
        ranked = [rank_fraction(f) for f in scores] if self.cfg.switcher.allocation == "rank" else scores
        masks = self.budget_cut(ranked, fraction, final=final)
        for k, (score, m) in enumerate(zip(scores, masks)):
            m = m.to(score.device)  # ranks are made on the CPU
            self.source.masks()[k].copy_(m)
            if final and self.source.hard:
                self.source.frozen()[k].copy_(m)
            elif final:
                f = score.clamp_min(0)  # the factors (scores: the same where > 0)
                # A unit the budget keeps although its factor is 0 comes back at its layer's typical
                # factor: it must survive the export for the compact model to meet the budget.
                on = f[f > 0]
                typical = on.mean() if on.numel() else torch.ones((), device=f.device)
                self.source.frozen()[k].copy_(torch.where(f > 0, f, typical) * m)

    def selectable(self, epoch: int) -> bool:
        # Only switched networks are results of this method, never a dense warm-up epoch; with a
        # budget, only networks at the budget (after the cut).
        return epoch >= self.cut_epoch if self.budgeted else self.gated(epoch)
