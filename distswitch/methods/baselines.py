"""Baselines under the same engine: dense; magnitude pruning (Han et al. 2015, here per neuron:
lowest weight-norm units per layer); network slimming (Liu et al. 2017: L1 on per-channel scales,
global threshold). Both prune once, `prune.finetune_epochs` before the end, then fine-tune."""

from __future__ import annotations

import math

import torch

from distswitch.config import Config
from distswitch.gates import GateSpec
from distswitch.methods.base import METHODS, FixedFactors, Method, keep_top


@METHODS.register("dense")
class Dense(Method):
    pass


class _PruneOnce(Method):
    def __init__(self, cfg: Config, specs: list[GateSpec], steps_per_epoch: int, learnable: bool) -> None:
        super().__init__(cfg, specs, steps_per_epoch)
        self.source = FixedFactors(specs, learnable)
        self.prune_epoch = cfg.train.epochs - cfg.prune.finetune_epochs

    def on_epoch_start(self, epoch: int, weights: list[torch.Tensor]) -> None:
        if epoch == self.prune_epoch:
            self.source.set_masks(self.masks(weights))

    def masks(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def selectable(self, epoch: int) -> bool:
        return epoch >= self.prune_epoch


def _count(fraction: float, n: int) -> int:
    """ceil(fraction * n), at least 1; rounded first so 0.55 * 100 keeps 55, not 56."""
    return max(1, math.ceil(round(fraction * n, 6)))


def _importance(spec: GateSpec, w: torch.Tensor) -> torch.Tensor:
    """Per connection |w|; per unit the L2 norm of its row."""
    w = w.detach()
    return w.abs() if spec.side == "weight" else w.norm(dim=1)


@METHODS.register("magnitude")
class Magnitude(_PruneOnce):
    def __init__(self, cfg: Config, specs: list[GateSpec], steps_per_epoch: int) -> None:
        super().__init__(cfg, specs, steps_per_epoch, learnable=False)

    def gated(self, epoch: int) -> bool:
        return epoch >= self.prune_epoch

    def masks(self, weights):
        frac = self.cfg.prune.kept_fraction
        out = []
        for spec, w in zip(self.specs, weights):
            score = _importance(spec, w)
            out.append(keep_top(score, _count(frac, score.numel())))
        return out


@METHODS.register("slimming")
class Slimming(_PruneOnce):
    def __init__(self, cfg: Config, specs: list[GateSpec], steps_per_epoch: int) -> None:
        super().__init__(cfg, specs, steps_per_epoch, learnable=True)

    def gated(self, epoch: int) -> bool:
        return True  # the scales act from the start; that is what the L1 term sparsifies

    def penalty(self, factors, epoch):
        if epoch >= self.prune_epoch or self.cfg.prune.l1 == 0:
            return 0.0
        return self.cfg.prune.l1 * sum(f.abs().sum() for f in factors)

    def masks(self, weights):
        # One global threshold on |scale| (Liu et al.), but every layer keeps at least one unit.
        scales = [s.detach().abs() for s in self.source.scales]
        flat = torch.cat([s.flatten() for s in scales])
        keep = _count(self.cfg.prune.kept_fraction, flat.numel())
        global_mask = keep_top(flat, keep)
        out, start = [], 0
        for s in scales:
            m = global_mask[start : start + s.numel()].view_as(s)
            start += s.numel()
            if m.sum() == 0:
                m = keep_top(s, 1)
            out.append(m)
        return out
