"""The switcher method: TNN and SNN trained alternately on the task loss."""

from __future__ import annotations

import torch

from distswitch.config import Config
from distswitch.gates import GateSpec
from distswitch.methods.base import METHODS, Method
from distswitch.schedule import Alternation, Phase
from distswitch.switcher import build_switcher


@METHODS.register("switch")
class Switch(Method):
    source_phase = Phase.SNN

    def __init__(self, cfg: Config, specs: list[GateSpec], steps_per_epoch: int) -> None:
        super().__init__(cfg, specs, steps_per_epoch)
        self.source = build_switcher(specs, cfg.switcher)
        self.alternation = Alternation(cfg.schedule.update_ratio, cfg.schedule.warmup_epochs, steps_per_epoch,
                                       finetune_from=cfg.train.epochs - cfg.schedule.finetune_epochs)

    def phase_at(self, epoch: int, step: int) -> Phase:
        return self.alternation.phase_at(epoch, step)

    def gated(self, epoch: int) -> bool:
        return self.alternation.gated(epoch)

    def penalty(self, factors: list[torch.Tensor], epoch: int):
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

    def selectable(self, epoch: int) -> bool:
        # Only switched networks are results of this method, never a dense warm-up epoch.
        return self.gated(epoch)
