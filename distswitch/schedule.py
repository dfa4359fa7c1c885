"""The two alternating phases and which one a training step belongs to."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union


class Phase(enum.Enum):
    TNN = "tnn"  # task network learns, switcher frozen
    SNN = "snn"  # switcher learns, task network frozen


@dataclass(frozen=True)
class Alternation:
    """`update_ratio` k: k TNN steps then 1 SNN step; "epoch": whole epochs alternate, TNN first.

    Epochs before `warmup_epochs` train the dense TNN (`gated` is False there); from epoch
    `finetune_from` on, only the TNN trains (the switcher's factors still act). Steps are counted
    from the end of the warm-up, so the pattern does not depend on the epoch length.
    """

    update_ratio: Union[int, str]
    warmup_epochs: int
    steps_per_epoch: int
    finetune_from: Union[int, None] = None

    def gated(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs

    def phase_at(self, epoch: int, step_in_epoch: int) -> Phase:
        if not self.gated(epoch) or (self.finetune_from is not None and epoch >= self.finetune_from):
            return Phase.TNN
        if self.update_ratio == "epoch":
            return Phase.TNN if (epoch - self.warmup_epochs) % 2 == 0 else Phase.SNN
        k = int(self.update_ratio)
        step = (epoch - self.warmup_epochs) * self.steps_per_epoch + step_in_epoch
        return Phase.SNN if step % (k + 1) == k else Phase.TNN
