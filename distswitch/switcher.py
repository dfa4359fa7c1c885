"""Switcher networks (SNN): the TNN's weights in, non-negative factors out.

Contract (checked by `GateSet.set`): ``forward(views)`` takes one `UnitWeights` per gated layer
(incoming weights [units, fan], and for output units their outgoing weights and BatchNorm gain; see
`distswitch.gates`), and returns one factor tensor per layer, shape [units] for neuron gates or
[units, fan] for connection gates. Every factor is >= 0; a final ReLU
makes exact zeros possible (the papers' only source of pruning). Factors are a function of the
weights alone: no per-neuron free parameters, no layer index, no input data.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from distswitch.config import SwitcherConfig
from distswitch.gates import GateSpec, UnitWeights
from distswitch.registry import Registry

SwitcherBuilder = Callable[[list[GateSpec], SwitcherConfig], nn.Module]
SWITCHERS: Registry[SwitcherBuilder] = Registry("switcher", "switcher.arch")

# Thresholds on |standardised weight|: the fractions above them sketch the row's distribution in
# O(fan) without sorting (sorting every row each step cost more than a small TNN's whole step).
_THRESHOLDS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def build_switcher(specs: list[GateSpec], cfg: SwitcherConfig) -> nn.Module:
    return SWITCHERS.get(cfg.arch)(specs, cfg)


def describe_rows(w: torch.Tensor) -> torch.Tensor:
    """A fixed-size description of each row of `w` [units, fan] -> [units, DESCRIPTION_SIZE].

    Scale-free within a layer (weights divided by the layer's std) so one network serves layers of
    any fan-in and initialisation; the row's norm relative to its layer keeps the magnitude signal.
    Features: fractions of |z| above 6 thresholds, fraction positive, and 7 moments.
    """
    w = w.detach().float()
    units, fan = w.shape
    scale = w.std() if w.numel() > 1 else w.abs().mean()
    z = w / (scale + 1e-8)
    absz = z.abs()
    tails = [(absz > t).float().mean(dim=1) for t in _THRESHOLDS]
    norms = z.square().mean(dim=1).sqrt()
    rel_norm = torch.log(norms / (norms.mean() + 1e-8) + 1e-8)
    mean = z.mean(dim=1)
    std = (norms.square() - mean.square()).clamp_min(0).sqrt()
    feats = tails + [
        (z > 0).float().mean(dim=1), mean, std, absz.mean(dim=1), absz.amax(dim=1), norms, rel_norm,
        torch.full((units,), math.log(fan) / 10, device=w.device),
    ]
    return torch.stack(feats, dim=1)


DESCRIPTION_SIZE = len(_THRESHOLDS) + 8


# Shape features of a row longer than this are read from evenly spaced entries of it (the row's
# RMS still from all): a distribution's tails need no 8,000 samples, and the switcher runs every step.
_SHAPE_SAMPLES = 256


def _shape(sample: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
    """Scale-free shape features [units, SHAPE_SIZE] of rows given some of their entries and their RMS
    (the entries divided by it): fractions above the thresholds, fraction positive, mean, mean |z|,
    max |z| / 4."""
    z = sample.float() / (rms[:, None] + 1e-12)
    absz = z.abs()
    # Six compares beat one broadcast against all thresholds on a CPU (no [units, fan, 6] temporary).
    feats = [(absz > t).float().mean(dim=1) for t in _THRESHOLDS]
    feats += [(z > 0).float().mean(dim=1), z.mean(dim=1), absz.mean(dim=1), absz.amax(dim=1) / 4]
    return torch.stack(feats, dim=1)


SHAPE_SIZE = len(_THRESHOLDS) + 4


def _sampled(w: torch.Tensor) -> torch.Tensor:
    fan = w.shape[1]
    if fan <= _SHAPE_SAMPLES:
        return w
    positions = torch.linspace(0, fan - 1, _SHAPE_SAMPLES, device=w.device).long()
    return torch.index_select(w, 1, positions)  # 3x faster than w[:, positions] on a CPU


def describe_units(view: UnitWeights) -> torch.Tensor:
    """A description of each unit from both sides -> [units, BOTH_SIZE], invariant to rescaling.

    For a ReLU unit, incoming weights times c > 0 and outgoing ones divided by c leave the network's
    function unchanged: rows enter as shapes (divided by their own RMS), and the magnitude only as
    the product of the two sides' RMS (the BatchNorm's |gain| replaces the incoming RMS where one
    follows, since BN normalises the incoming scale away), relative to the layer's mean (log-space).
    A side that is missing (no reader found) contributes zeros and a flag.
    """
    w_in = view.incoming.detach().float()
    units, fan = w_in.shape
    rms_in = w_in.square().mean(dim=1).sqrt()
    in_feats, log_in = _shape(_sampled(w_in), rms_in), torch.log(rms_in + 1e-12)
    if view.gain is not None:
        log_in = torch.log(view.gain.detach().float().norm(dim=1) + 1e-12)
    if view.has_outgoing:
        fan_out = view.fan_out
        rms_out = view.outgoing_rms().float()
        out_feats, log_out = _shape(view.outgoing_sample(_SHAPE_SAMPLES), rms_out), torch.log(rms_out + 1e-12)
        has_out = 1.0
    else:
        out_feats = in_feats.new_zeros(units, SHAPE_SIZE)
        log_out, fan_out, has_out = torch.zeros(units, device=w_in.device), 1, 0.0
    size = log_in + log_out
    rel = size - size.mean()
    spread = (size.std() if units > 1 else size.new_zeros(())).expand(units)  # a tensor: no host sync
    const = torch.tensor([math.log(fan) / 10, math.log(fan_out) / 10, has_out], device=w_in.device).expand(units, 3)
    return torch.cat([in_feats, out_feats, torch.stack([rel, rel.clamp(max=0), spread], dim=1), const], dim=1)


BOTH_SIZE = 2 * SHAPE_SIZE + 6


def revivable_relu(h: torch.Tensor) -> torch.Tensor:
    """relu(h) forward, identity backward: a factor at exactly 0 still receives the task loss's
    gradient, so a unit switched off early can come back if turning it on would lower the loss."""
    return torch.where(h > 0, h, h - h.detach())


@SWITCHERS.register("rowwise")
class RowwiseSwitcher(nn.Module):
    """One small MLP shared by all gated layers, applied to each unit's row description.

    Neuron gates: factor_i = relu(mlp(d_i)). Connection gates: the MLP gives a per-row slope and
    offset, factor_ij = relu(a_i * |w_ij| / std + b_i), so the cost stays linear in the weights.
    Starts at factor = `init_factor` everywhere (zero last-layer weights), i.e. the dense network.
    """

    def __init__(self, specs: list[GateSpec], cfg: SwitcherConfig) -> None:
        super().__init__()
        self.sides = [s.side for s in specs]
        self.both = cfg.describe == "both"
        self.relu = revivable_relu if cfg.revive else F.relu
        w = cfg.width
        size = BOTH_SIZE if self.both else DESCRIPTION_SIZE
        self.body = nn.Sequential(nn.Linear(size, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU())
        # Only the heads some layer uses: every parameter gets a gradient in each SNN step, which
        # DDP's reducer relies on (no find_unused_parameters traversal).
        if any(side != "weight" for side in self.sides):
            self.neuron_head = nn.Linear(w, 1)
            nn.init.zeros_(self.neuron_head.weight)
            nn.init.constant_(self.neuron_head.bias, cfg.init_factor)
        if "weight" in self.sides:
            self.connection_head = nn.Linear(w, 2)
            nn.init.zeros_(self.connection_head.weight)
            with torch.no_grad():
                self.connection_head.bias.copy_(torch.tensor([0.0, cfg.init_factor]))

    def describe(self, views: list[UnitWeights]) -> list[torch.Tensor]:
        """The body's input per layer: [units, features]."""
        # Only output units have a second side; the other sides' rows already are the whole story.
        return [describe_units(v) if self.both and side == "out" else _pad(describe_rows(v.incoming), self.body[0].in_features)
                for side, v in zip(self.sides, views)]

    def forward(self, views: list[UnitWeights]) -> list[torch.Tensor]:
        out = []
        for side, view, d in zip(self.sides, views, self.describe(views)):
            w = view.incoming
            h = self.body(d)
            if side == "weight":
                slope, offset = self.connection_head(h).unbind(dim=1)
                z = w.detach().abs() / (w.detach().std() + 1e-8)
                out.append(self.relu(slope[:, None] * z + offset[:, None]))
            else:
                out.append(self.relu(self.neuron_head(h).squeeze(1)))
        return out


def _pad(d: torch.Tensor, size: int) -> torch.Tensor:
    return F.pad(d, (0, size - d.shape[1])) if d.shape[1] < size else d


class _UNet(nn.Module):
    """Encoder-decoder over one weight matrix seen as a 1-channel image [1, 1, units, fan]."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList(_block(1 if i == 0 else chans[i - 1], chans[i]) for i in range(depth + 1))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in range(depth))
        self.merge = nn.ModuleList(_block(2 * chans[i], chans[i]) for i in range(depth))
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        units, fan = w.shape
        mult = 2**self.depth
        x = w.detach()[None, None]
        x = F.pad(x, (0, -fan % mult, 0, -units % mult))
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for i in reversed(range(self.depth)):
            x = self.merge[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)[0, 0, :units, :fan]


def _block(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, track_running_stats=False), nn.ReLU())


@SWITCHERS.register("unet")
class UNetSwitcher(nn.Module):
    """The papers' switcher: one U-Net per gated layer over its raw weight matrix.

    The output map is averaged over the fan axis for neuron gates; a final BatchNorm + ReLU gives
    factors >= 0 with exact zeros, as in the authors' code. BatchNorm uses the statistics of the
    one weight image (no running stats), so factors depend on the current weights alone. The final
    BN starts at scale 0.1 / shift `init_factor`, so factors start near `init_factor`.
    """

    def __init__(self, specs: list[GateSpec], cfg: SwitcherConfig) -> None:
        super().__init__()
        self.sides = [s.side for s in specs]
        self.nets = nn.ModuleList(_UNet(cfg.width, _depth(s.units, s.fan)) for s in specs)
        self.norms = nn.ModuleList(nn.BatchNorm1d(1, track_running_stats=False) for _ in specs)
        for norm in self.norms:
            nn.init.constant_(norm.weight, 0.1)
            nn.init.constant_(norm.bias, cfg.init_factor)

    def forward(self, views: list[UnitWeights]) -> list[torch.Tensor]:
        out = []
        for side, view, net, norm in zip(self.sides, views, self.nets, self.norms):
            m = net(view.incoming)
            if side != "weight":
                m = m.mean(dim=1)
            flat = norm(m.reshape(1, 1, -1)).reshape(m.shape)
            out.append(F.relu(flat))
        return out


def _depth(units: int, fan: int) -> int:
    """Poolings the smaller side allows (at most 3: the authors' nets have 3 to 4 levels)."""
    return max(0, min(3, int(math.log2(max(min(units, fan), 1))) - 1))
