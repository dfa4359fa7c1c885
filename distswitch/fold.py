"""A gated layer's forward with its factors applied, set by `distswitch.gates.GateSet` as the
layer's instance ``forward`` (so DDP, hooks, torch.compile and the state_dict see the plain layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FoldedForward:
    """A gated layer's forward with the factors applied: folded into its parameters while the
    factors take no gradient (TNN steps, evaluation) -- ``out`` scales weight rows and bias
    (f * (Wx + b) = (f W) x + f b), ``in`` weight columns, ``weight`` every connection -- since
    scaling a [units, fan] matrix costs far less than scaling the output activations and their
    gradient. While the factors train (SNN steps) ``out`` and ``in`` scale the activations instead:
    the folded form's factor gradient would need the layer's weight gradient, which that step
    otherwise skips. With no factors set it is the layer's own forward."""

    def __init__(self, gates, k: int, layer: nn.Module, side: str, rows: int = 1) -> None:
        self.gates, self.k, self.layer, self.side, self.rows = gates, k, layer, side, rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer, factors = self.layer, self.gates.factors
        plain = type(layer).forward
        if factors is None:
            return plain(layer, x)
        f = factors[self.k]
        if self.rows > 1:  # one factor for several rows (an attention head's)
            f = f.repeat_interleave(self.rows)
        if f.requires_grad and self.side == "out":
            out = plain(layer, x)
            if isinstance(layer, nn.Linear):  # its units are the last dimension, tokens or not
                return out * f.to(out.dtype)
            return out * f.to(out.dtype).view(1, -1, *([1] * (out.dim() - 2)))
        if f.requires_grad and self.side == "in":
            return plain(layer, x * f.to(x.dtype))
        w, b = layer.weight, layer.bias
        if self.side == "out":
            w = w * f.view(-1, *([1] * (w.dim() - 1)))
            b = b * f if b is not None else None
        else:  # ``in``: [fan] over the columns; ``weight``: [units, fan], the matrix's own shape
            w = w * f
        if isinstance(layer, nn.Conv2d):
            return layer._conv_forward(x, w, b)
        return F.linear(x, w, b)
