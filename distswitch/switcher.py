"""Switcher networks (SNN): the TNN's weights in, non-negative factors out.

Contract (checked by `GateSet.set`): ``forward(views)`` takes one `UnitWeights` per gated layer
(incoming weights [units, fan], and for output units their outgoing weights and BatchNorm gain; see
`distswitch.unit_weights`), and returns one factor tensor per layer, shape [units] for neuron gates or
[units, fan] for connection gates. Every factor is >= 0; a final ReLU
makes exact zeros possible (the papers' only source of pruning). Factors are a function of the
weights alone: no per-neuron free parameters, no layer index, no input data. A switcher may also
have ``scores(views)``, the factors before that ReLU, which a budget's cut orders tied zeros by
(`switcher.ties: score`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from distswitch.config import SwitcherConfig
from distswitch.describe import BOTH_SIZE, DESCRIPTION_SIZE, describe_layers, describe_rows
from distswitch.gates import GateSpec
from distswitch.registry import Registry
from distswitch.unit_weights import UnitWeights

SwitcherBuilder = Callable[[list[GateSpec], SwitcherConfig], nn.Module]
SWITCHERS: Registry[SwitcherBuilder] = Registry("switcher", "switcher.arch")


def build_switcher(specs: list[GateSpec], cfg: SwitcherConfig) -> nn.Module:
    return SWITCHERS.get(cfg.arch)(specs, cfg)


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
        self._plans: dict = {}  # describe_layers' shape-only tensors, made once
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
        both = [k for k, side in enumerate(self.sides) if self.both and side == "out"]
        out = dict(zip(both, describe_layers([views[k] for k in both], self._plans))) if both else {}
        return [
            out[k] if k in out else _pad(describe_rows(v.incoming), self.body[0].in_features)
            for k, v in enumerate(views)
        ]

    def forward(self, views: list[UnitWeights]) -> list[torch.Tensor]:
        return [self.relu(s) for s in self.scores(views)]

    def hidden(self, views: list[UnitWeights]) -> list[torch.Tensor]:
        """Each unit's hidden state [units, width] per layer, which the heads read."""
        # All layers' units through the body at once: the same rows, fewer ops.
        ds = self.describe(views)
        return self.body(torch.cat(ds)).split([len(d) for d in ds])

    def scores(self, views: list[UnitWeights]) -> list[torch.Tensor]:
        """The factors before the final ReLU: their order where the factors are 0 (a budget's cut
        breaks the ReLU's ties with it)."""
        hs = self.hidden(views)
        neuron = [k for k, side in enumerate(self.sides) if side != "weight"]
        out: list[torch.Tensor | None] = [None] * len(views)
        if neuron:
            f = self.neuron_head(torch.cat([hs[k] for k in neuron])).squeeze(1)
            for k, fk in zip(neuron, f.split([len(hs[k]) for k in neuron])):
                out[k] = fk
        for k, side in enumerate(self.sides):
            if side == "weight":
                w = views[k].incoming.detach()
                slope, offset = self.connection_head(hs[k]).unbind(dim=1)
                out[k] = slope[:, None] * w.abs() / (w.std() + 1e-8) + offset[:, None]
        return out


def edges(views: list[UnitWeights]) -> list[tuple[int, int, torch.Tensor]]:
    """(p, j, A): A [units_j, units_p] >= 0, the norm of the weights from unit i of group p into
    unit o of group j (a head's rows summed into its unit), for every reader that is a gated group."""
    out = []
    for p, view in enumerate(views):
        for (w, idx), j in zip(view.readers, view.reader_groups):
            if j is None:
                continue
            sq = w.float().square()
            if sq.dim() > 2:
                sq = sq.sum(dim=tuple(range(2, sq.dim())))  # [out, in]: a kernel's taps together
            units, per = idx.shape
            a = torch.index_select(sq, 1, idx.flatten()).view(sq.shape[0], units, per).sum(dim=2)  # [out, units_p]
            units_j = views[j].incoming.shape[0]
            out.append((p, j, a.view(units_j, -1, units).sum(dim=1).sqrt()))
    return out


@SWITCHERS.register("graph")
class GraphSwitcher(RowwiseSwitcher):
    """The relational switcher (`switcher.arch: graph`): messages along the weight graph.

    Nodes are the gated units (a coupled group's unit is one node); an edge joins unit i of group p
    to unit o of group j when a layer writing j reads i, weighted by the norm of the weights between
    them (a kernel's taps and a flattened channel's features together; `edges`). Each node starts
    from the rowwise switcher's hidden state of its description (both sides, rescaling-invariant);
    each of `switcher.rounds` rounds then adds an MLP of [itself, the weighted mean of the units that
    feed it, of the units it feeds, the mean of its own group]. So a unit's factor depends on what
    feeds it, what it feeds and its group's other units; the map is equivariant to permuting any
    group's units, and still a function of the current weights alone (no per-unit parameters).

    Edge weights enter as weighted means, so scaling a layer's weights changes no message. Ungated
    layers' units (the classifier's, a ViT's stream) are no nodes: a group without gated neighbours
    gets its group mean only. Each round's last layer starts at zero: a fresh graph switcher gives
    the rowwise one's factors (`init_factor` everywhere)."""

    def __init__(self, specs: list[GateSpec], cfg: SwitcherConfig) -> None:
        super().__init__(specs, cfg)
        w = cfg.width
        self.rounds = nn.ModuleList(
            nn.Sequential(nn.Linear(4 * w, w), nn.ReLU(), nn.Linear(w, w)) for _ in range(cfg.rounds)
        )
        for r in self.rounds:
            nn.init.zeros_(r[2].weight)
            nn.init.zeros_(r[2].bias)

    def hidden(self, views: list[UnitWeights]) -> list[torch.Tensor]:
        hs = list(super().hidden(views))
        sizes = [len(h) for h in hs]
        graph = edges(views)
        # Per node: the total weight of its edges in (from writers' inputs) and out (to readers).
        weight_in = [hs[0].new_zeros(n) for n in sizes]
        weight_out = [hs[0].new_zeros(n) for n in sizes]
        for p, j, a in graph:
            weight_in[j] = weight_in[j] + a.sum(dim=1)
            weight_out[p] = weight_out[p] + a.sum(dim=0)
        norm_in = [1 / (t + 1e-12) for t in weight_in]  # a node without edges: a zero message
        norm_out = [1 / (t + 1e-12) for t in weight_out]
        for layer in self.rounds:
            msg_in = [torch.zeros_like(h) for h in hs]
            msg_out = [torch.zeros_like(h) for h in hs]
            for p, j, a in graph:
                msg_in[j] = msg_in[j] + a @ hs[p]
                msg_out[p] = msg_out[p] + a.t() @ hs[j]
            h = torch.cat(hs)
            context = torch.cat(
                [
                    h,
                    torch.cat([m * n[:, None] for m, n in zip(msg_in, norm_in)]),
                    torch.cat([m * n[:, None] for m, n in zip(msg_out, norm_out)]),
                    torch.cat([x.mean(dim=0, keepdim=True).expand_as(x) for x in hs]),
                ],
                dim=1,
            )
            hs = list((h + layer(context)).split(sizes))
        return hs


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
        return [F.relu(s) for s in self.scores(views)]

    def scores(self, views: list[UnitWeights]) -> list[torch.Tensor]:
        """The factors before the final ReLU."""
        out = []
        for side, view, net, norm in zip(self.sides, views, self.nets, self.norms):
            m = net(view.incoming)
            if side != "weight":
                m = m.mean(dim=1)
            out.append(norm(m.reshape(1, 1, -1)).reshape(m.shape))
        return out


def _depth(units: int, fan: int) -> int:
    """Poolings the smaller side allows (at most 3: the authors' nets have 3 to 4 levels)."""
    return max(0, min(3, int(math.log2(max(min(units, fan), 1))) - 1))
