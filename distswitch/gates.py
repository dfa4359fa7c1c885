"""Where factors attach to a network: one mechanism for every model.

A *gated layer* is a Conv2d or Linear whose units (output channels / neurons, or input features, or
single connections) can be scaled by a factor. Three sides:

- ``out``: one factor per output unit, applied to the layer's affine output -- after its BatchNorm
  when one follows, because BN would normalise a scale applied before it away. Applying it before the
  activation keeps it foldable into the affine parameters for any activation (ReLU6 included), and a
  zero factor makes the unit's output exactly 0.
- ``in``: one factor per input feature of a Linear layer (the papers' "neurons" variant for the
  classifier: y = (x * g) W^T). The papers gate every FC layer's inputs, the image pixels included;
  ``all`` here gates hidden units only (the same hidden neurons, read from their incoming weights),
  since removing input pixels would change the model's interface.
- ``weight``: one factor per connection of a Linear layer (the papers' "connections" variant:
  y = x (W * G)^T).

The switcher describes unit ``i`` by row ``i`` of `GateSet.weights()`: the unit's incoming weights
(``out``), outgoing weights (``in``), or the layer's weight matrix (``weight``). `GateSet.views()` adds
the other side of each ``out`` unit: its outgoing weights in every layer that reads it (found once with
Torch-Pruning's dependency graph, so flattening, residual additions and several readers are followed)
and the scale and shift of the BatchNorm that follows it, if one does. A ReLU unit's function is
unchanged when its incoming weights are multiplied by c > 0 and its outgoing ones divided by c, so
only both sides together say how much a unit contributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn

from distswitch.config import ConfigError
from distswitch.coupling import Readers, coupled_writers, dependency_graph
from distswitch.fold import FoldedForward
from distswitch.models.vit import Attention
from distswitch.unit_weights import UnitWeights

Side = Literal["out", "in", "weight"]
GATED_MODES = ("all", "fc", "classifier")
_WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class GateSpec:
    """One gated layer.

    Attributes:
        layer: name of the Conv2d/Linear whose weights describe the units.
        point: name of the module whose output (``out``) / input (``in``) is scaled; for ``weight``
            the layer itself.
        side: ``out`` | ``in`` | ``weight`` (see module docstring).
        units: number of factors per row dimension (channels, neurons or input features).
        fan: weights describing one unit (row length of the description matrix: every writer's
            incoming weights, side by side).
        writers: for an ``out`` unit group, the other (layer, point) pairs that write its channels
            (a residual stream's blocks and shortcuts, a depthwise conv after its producer); the one
            factor scales each writer's output, so the group's channel is scaled once.
        heads_of: for an attention head unit, the `distswitch.models.vit.Attention` module's path;
            then ``layer`` is its v projection, whose output the factor scales (a head's output is
            linear in its values), and the unit is `rows` rows of q, k and v (the head's width).
        rows: a unit's rows in its layer (1, or a head's width).
    """

    layer: str
    point: str
    side: Side
    units: int
    fan: int
    writers: tuple[tuple[str, str], ...] = ()
    heads_of: str = ""
    rows: int = 1

    @property
    def members(self) -> tuple[tuple[str, str], ...]:
        """Every (layer, point) whose output the factor scales, this spec's own first."""
        return ((self.layer, self.point), *self.writers)

    @property
    def factor_shape(self) -> tuple[int, ...]:
        return (self.units, self.fan) if self.side == "weight" else (self.units,)


def _classifier_name(model: nn.Module) -> str:
    """The output layer: the last Linear registered in the model (its outputs are the classes)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear output layer to treat as the classifier")
    return linears[-1]


def find_gates(
    model: nn.Module, gated: str, granularity: str, example: torch.Tensor, graph: tp.DependencyGraph | None = None
) -> list[GateSpec]:
    """The gated unit groups of `model` (inputs shaped like `example`) for `model.gated` = all | fc | classifier.

    all: every prunable channel group and hidden FC neuron (granularity "connection": every Linear's
    weights). fc: hidden FC neurons only (connection: every Linear's weights). classifier: the
    classifier's input features (connection: its weights) -- the papers' setting for ResNet and
    MobileNet. An ``out`` unit is a coupled group (Torch-Pruning's dependency graph): every channel
    that must go together, named after the first layer that writes it. The input's channels and the
    classifier's outputs are never units.
    """
    if gated not in GATED_MODES:
        raise ConfigError(f"model.gated: got {gated!r}; choose one of: {', '.join(GATED_MODES)}")
    modules = list(model.named_modules())
    by_name = dict(modules)
    position = {name: i for i, (name, _) in enumerate(modules)}
    classifier = _classifier_name(model)
    specs, covered = [], set()
    for name, layer in modules:
        if isinstance(layer, Attention) and gated == "all" and granularity == "neuron":
            parts = ("q", "k", "v", "proj")
            covered.update(f"{name}.{p}" for p in parts)
            specs.append(
                GateSpec(
                    f"{name}.v",
                    f"{name}.v",
                    "out",
                    layer.heads,
                    3 * layer.head_dim * layer.q.in_features,
                    heads_of=name,
                    rows=layer.head_dim,
                )
            )
            continue
        if not isinstance(layer, _WEIGHT_LAYERS) or name in covered:
            continue
        is_linear = isinstance(layer, nn.Linear)
        w = layer.weight
        if granularity == "connection" and is_linear and (gated != "classifier" or name == classifier):
            specs.append(GateSpec(name, name, "weight", w.shape[0], w.shape[1]))
        elif gated == "classifier":
            if name == classifier and granularity == "neuron":
                specs.append(GateSpec(name, name, "in", w.shape[1], w.shape[0]))
        elif name != classifier and (gated == "all" or (gated == "fc" and is_linear)):
            graph = graph or dependency_graph(model, example)
            writers, gateable = coupled_writers(graph, model, name)
            covered.update(writers)
            if (
                gateable
                and classifier not in writers
                and (gated != "fc" or all(isinstance(by_name[n], nn.Linear) for n in writers))
            ):
                specs.append(_group_spec(modules, position, writers))
    if not specs:
        raise ConfigError(
            f"model.gated: {gated!r} with switcher.granularity {granularity!r} selects no layer of "
            f"{type(model).__name__}; use 'all' or 'classifier'"
        )
    return specs


def _group_spec(modules: list[tuple[str, nn.Module]], position: dict[str, int], writers: list[str]) -> GateSpec:
    """One ``out`` unit group: the channels every writer in `writers` writes, named after the first."""
    members = tuple((n, _affine_output(modules, position[n])) for n in writers)
    weights = [modules[position[n]][1].weight for n in writers]
    return GateSpec(
        writers[0], members[0][1], "out", weights[0].shape[0], sum(w[0].numel() for w in weights), members[1:]
    )


def _affine_output(modules: list[tuple[str, nn.Module]], i: int) -> str:
    """The BatchNorm right after layer i (same width) if there is one, else the layer itself."""
    name, layer = modules[i]
    width = layer.weight.shape[0]
    for next_name, nxt in modules[i + 1 :]:
        if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.num_features == width:  # SyncBatchNorm too
            return next_name
        if isinstance(nxt, _WEIGHT_LAYERS):
            break
    return name


class GateSet:
    """Hooks that scale the gated units of `model` by the factors last passed to `set`.

    With no factors set (None) the hooks leave the network unchanged, so one model object serves the
    dense warm-up, gated training and evaluation. Factors are set once per step, never per sample.
    """

    def __init__(self, model: nn.Module, specs: list[GateSpec], readers: list[Readers] | None = None) -> None:
        self.model = model
        self.specs = list(specs)
        modules = dict(model.named_modules())
        self._layers = [modules[s.layer] for s in self.specs]
        # Per group: every writer's layer and the norm after it (None where the layer is the point).
        self._members = [
            [
                (modules[layer], modules[point] if s.side == "out" and point != layer else None)
                for layer, point in s.members
            ]
            for s in self.specs
        ]
        # Per group: the layers whose rows describe a unit (a head's: q, k and v).
        self._described = [
            [modules[f"{s.heads_of}.{p}"] for p in ("q", "k", "v")] if s.heads_of else [layer for layer, _ in m]
            for s, m in zip(self.specs, self._members)
        ]
        # [reader layer, index]: the index moves to the weights' device once (in `views`), not every step.
        self._readers = [[[modules[name], idx] for name, idx in r] for r in readers] if readers else [[] for _ in specs]
        index = {id(layer): j for j, layers in enumerate(self._described) for layer in layers}
        owner = {name: index[id(m)] for name, m in modules.items() if id(m) in index}
        self._reader_groups = [[owner.get(name) for name, _ in r] for r in readers] if readers else [[] for _ in specs]
        self._caches: list[dict] = [{} for _ in specs]  # per layer: the outgoing sample's positions
        self._factors: list[torch.Tensor] | None = None
        self._handles = []
        self._folded: list[nn.Module] = []
        for k, spec in enumerate(self.specs):
            for layer, point in spec.members:
                point = modules[point]
                if spec.side == "out" and point is not modules[layer]:  # after a BatchNorm: scale its output
                    self._handles.append(point.register_forward_hook(self._out_hook(k)))
                else:
                    # Into the layer's weights: scaling a [units, fan] matrix costs far less than scaling
                    # its output activations (and their gradient) in every step; the same function.
                    point.forward = FoldedForward(self, k, point, spec.side, spec.rows)
                    self._folded.append(point)

    def weights(self) -> list[torch.Tensor]:
        """Description matrices, one per gated group: shape [units, fan] (a view of the weights where
        one layer writes the group; its writers' rows side by side where several do)."""
        out = []
        for spec, layers in zip(self.specs, self._described):
            rows = [layer.weight.t() if spec.side == "in" else layer.weight.reshape(spec.units, -1) for layer in layers]
            out.append(rows[0] if len(rows) == 1 else torch.cat(rows, dim=1))
        return out

    def unit_sq_norms(self) -> list[torch.Tensor | None]:
        """Per gated group [units]: each unit's squared group norm over everything removing it
        removes -- every writer's incoming weights and bias and the BatchNorm scale and shift after
        it, and its outgoing weights in every reader -- with gradients (a penalty on it trains the
        TNN). None for connection gates (a connection is no group)."""
        out = []
        for spec, w, members, described, readers in zip(
            self.specs, self.weights(), self._members, self._described, self._readers
        ):
            if spec.side == "weight":
                out.append(None)
                continue
            sq = w.square().sum(dim=1)
            if spec.side == "out":
                for layer in described:
                    if layer.bias is not None:
                        sq = sq + layer.bias.view(spec.units, -1).square().sum(dim=1)
                for _, norm in members:
                    if norm is not None and norm.affine:
                        sq = sq + norm.weight.square() + norm.bias.square()
                for reader, idx in readers:
                    rw = reader.weight
                    per_input = rw.square().sum(dim=[d for d in range(rw.dim()) if d != 1])  # [reader inputs]
                    sq = sq + per_input[idx.to(rw.device)].sum(dim=1)
            out.append(sq)
        return out

    @torch.no_grad()
    def views(self) -> list[UnitWeights]:
        """Both sides of every gated unit (see `UnitWeights`), detached: factors are trained through
        the source's parameters, never through the weights they read. A group's gain is every
        writer's norm scale and shift side by side."""
        out = []
        for w, readers, groups, members, cache in zip(
            self.weights(), self._readers, self._reader_groups, self._members, self._caches
        ):
            for reader in readers:
                if reader[1].device != reader[0].weight.device:
                    reader[1] = reader[1].to(reader[0].weight.device)
                    cache.clear()
            gains = [
                torch.stack([norm.weight.detach(), norm.bias.detach()], dim=1)
                for _, norm in members
                if norm is not None and norm.affine
            ]
            gain = (gains[0] if len(gains) == 1 else torch.cat(gains, dim=1)) if gains else None
            out.append(
                UnitWeights(
                    w.detach(),
                    gain=gain,
                    readers=[(layer.weight.detach(), idx) for layer, idx in readers],
                    reader_groups=groups,
                    cache=cache,
                )
            )
        return out

    def set(self, factors: list[torch.Tensor] | None) -> None:
        if factors is not None:
            check_factors(self.specs, factors)
        self._factors = factors

    @property
    def factors(self) -> list[torch.Tensor] | None:
        return self._factors

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._folded:
            del module.forward  # the class's own forward again
        self._handles, self._folded = [], []
        self._factors = None

    def _out_hook(self, k: int):
        def hook(module, inputs, output):
            if self._factors is None:
                return output
            # In the output's dtype: fp32 factors would promote autocast's bf16/fp16 activations.
            f = self._factors[k].to(output.dtype)
            return output * f.view(1, -1, *([1] * (output.dim() - 2)))

        return hook


def check_factors(specs: list[GateSpec], factors: list[torch.Tensor]) -> None:
    """The one place factor shapes are checked against the gate specs."""
    if len(factors) != len(specs):
        raise ValueError(f"expected {len(specs)} factor tensors (one per gated layer), got {len(factors)}")
    for spec, f in zip(specs, factors):
        if tuple(f.shape) != spec.factor_shape:
            raise ValueError(
                f"factors for {spec.layer} ({spec.side}): shape {tuple(f.shape)}, expected {spec.factor_shape}"
            )


def kept_units(spec: GateSpec, factor: torch.Tensor) -> int:
    """Units still on: nonzero factor; for connection gates, neurons with any nonzero connection."""
    f = factor.detach()
    return int((f != 0).any(dim=1).sum()) if spec.side == "weight" else int((f != 0).sum())


def kept_report(specs: list[GateSpec], factors: list[torch.Tensor] | None) -> dict:
    """Per-layer and overall kept units (and connections for connection gates)."""
    layers = {}
    total = kept = 0
    for k, spec in enumerate(specs):
        on = spec.units if factors is None else kept_units(spec, factors[k])
        row = {"units": spec.units, "kept": on}
        if spec.side == "weight":
            nz = spec.units * spec.fan if factors is None else int((factors[k] != 0).sum())
            row.update(connections=spec.units * spec.fan, kept_connections=nz)
        layers[spec.layer] = row
        total += spec.units
        kept += on
    return {"layers": layers, "units": total, "kept": kept, "kept_fraction": kept / max(total, 1)}
