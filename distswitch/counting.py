"""What a network costs, counted on the network and predicted for any widths.

`count` counts a built model: its parameters, and its multiply-accumulates (MACs) for one input --
every convolution's and linear layer's weight products, and attention's two products (queries with
keys, weights with values: 2 N^2 per head channel for N tokens), the convention of the pruning
literature's tables (fvcore's conv/linear/matmul counts); elementwise work (BatchNorm, activations,
pooling, additions, softmax) is not a MAC.

`exact_cost_model` predicts the same two counts for the compact model of any per-group kept widths,
without building one: one traced forward pass gives each layer's kernel, groups and output size,
and Torch-Pruning's dependency graph says which unit group sets each of its channel dimensions (and
with how many entries per unit: a conv channel flattened into 16 features sets 16). Each layer's
cost is then a product of two affine functions of the kept counts: a quadratic in them, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from distswitch.config import ConfigError
from distswitch.cost import CostModel, units_cost_model
from distswitch.coupling import dependency_graph
from distswitch.gates import GateSpec
from distswitch.models.vit import Attention

COUNTED = (nn.Conv2d, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _layer_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Per counted layer: (output positions per input -- a conv's H*W, a linear's tokens, an attention
    layer's tokens -- , calls)."""
    seen: dict[str, tuple[int, int]] = {}
    handles = []
    batch = example.shape[0]
    for name, module in model.named_modules():
        if isinstance(module, (*COUNTED, Attention)):

            def hook(mod, inputs, output, name=name):
                if isinstance(mod, Attention):
                    positions = inputs[0].shape[1]
                elif isinstance(mod, nn.Conv2d):
                    positions = output[0].numel() // output.shape[1]
                else:
                    positions = output.numel() // (batch * mod.out_features)
                prev = seen.get(name, (positions, 0))
                seen[name] = (positions, prev[1] + 1)

            handles.append(module.register_forward_hook(hook))
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)  # eval: BatchNorm statistics untouched by the count
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return seen


def count(model: nn.Module, example: torch.Tensor) -> dict:
    """Parameters (all and nonzero) and multiply-accumulates for one example (`example[:1]`)."""
    shapes = _layer_shapes(model, example[:1])
    macs = 0
    for name, module in model.named_modules():
        if name in shapes:
            positions, calls = shapes[name]
            if isinstance(module, Attention):  # q.k^T and weights.v: N^2 per head channel each
                macs += calls * 2 * positions * positions * module.q.out_features
            else:
                macs += calls * positions * module.weight.numel()  # a weight entry is used once per position
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"params": int(params), "nonzero_params": nonzero, "macs": int(macs)}


@dataclass
class _Width:
    """One channel dimension's width as c + sum_g per[g] * x_g (x_g: group g's kept units)."""

    c: float
    per: dict[int, float] = field(default_factory=dict)

    def vector(self, n: int) -> np.ndarray:
        v = np.zeros(n)
        for g, p in self.per.items():
            v[g] += p
        return v


_OUT_HANDLERS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
_IN_HANDLERS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
# One width for both sides: a depthwise conv's input and output, a norm's channels.
_BOTH_HANDLERS = (
    tp.prune_depthwise_conv_out_channels,
    tp.prune_depthwise_conv_in_channels,
    tp.prune_batchnorm_out_channels,
    tp.prune_batchnorm_in_channels,
    tp.prune_layernorm_out_channels,
    tp.prune_layernorm_in_channels,
    tp.prune_groupnorm_out_channels,
    tp.prune_groupnorm_in_channels,
)


def _root_group(graph: tp.DependencyGraph, module: nn.Module, spec: GateSpec):
    if spec.side == "in":
        handler = tp.prune_linear_in_channels
    elif isinstance(module, nn.Conv2d):
        handler = tp.prune_conv_out_channels
    else:
        handler = tp.prune_linear_out_channels
    return graph.get_pruning_group(module, handler, idxs=list(range(spec.units)))


def widths(
    model: nn.Module, specs: list[GateSpec], example: torch.Tensor, graph: tp.DependencyGraph | None = None
) -> dict[tuple[str, str], _Width]:
    """(module path, "out" | "in") -> its width as a function of the groups' kept counts, for every
    module whose width some gated group sets; the others keep their dense widths."""
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    if graph is None:
        graph = dependency_graph(model, example)
    out: dict[tuple[str, str], _Width] = {}
    for g, spec in enumerate(specs):
        if spec.side == "weight":
            raise ConfigError("budget: connection gates keep the dense shapes; use switcher.granularity=neuron")
        if spec.heads_of:  # a head's rows in q, k, v and its columns of the output projection
            for part, dim in (("q", "out"), ("k", "out"), ("v", "out"), ("proj", "in")):
                out[(f"{spec.heads_of}.{part}", dim)] = _Width(0.0, {g: float(spec.rows)})
            continue
        group = _root_group(graph, modules[spec.layer], spec)
        if spec.side == "in" and not _in_removable(group, spec, names):
            continue  # features nobody else makes or reads alone: the export keeps them (cost constant)
        for item in group.items:
            handler, module = item.dep.handler, item.dep.target.module
            if module not in names:
                continue
            dims = (
                ["out"]
                if handler in _OUT_HANDLERS
                else ["in"]
                if handler in _IN_HANDLERS
                else ["out", "in"]
                if handler in _BOTH_HANDLERS
                else []
            )
            if not dims:
                raise ConfigError(
                    f"budget: a gated group reaches {names[module]} ({type(module).__name__}), whose "
                    "cost the cost model does not know; use model.gated=fc or classifier, or no budget"
                )
            for dim in dims:
                key = (names[module], dim)
                dense = _dense_width(module, dim)
                w = out.setdefault(key, _Width(float(dense)))
                per = len(item.idxs) / spec.units
                if g not in w.per:  # a depthwise conv or a norm is reached by two handlers: count it once
                    w.per[g] = per
                    w.c -= per * spec.units
    return out


def _in_removable(group, spec: GateSpec, names) -> bool:
    """As `export.removal_plan` decides for ``in`` gates: read by the gated layer alone and made by some layer."""
    consumers = {
        names.get(d.target.module)
        for d, _ in group
        if d.handler in (*_IN_HANDLERS, tp.prune_depthwise_conv_in_channels)
    }
    has_producer = any(d.handler in (*_OUT_HANDLERS, tp.prune_depthwise_conv_out_channels) for d, _ in group)
    return consumers == {spec.layer} and has_producer


def _dense_width(module: nn.Module, dim: str) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels if dim == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if dim == "out" else module.in_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    raise ConfigError(
        f"budget: a gated group sets the width of {type(module).__name__}, which the cost model "
        "does not know; use model.gated=fc or classifier, or no budget"
    )


class _Quadratic:
    """Accumulates sum_k scale_k * u_k(x) * v_k(x) for affine u, v into (c0, a, b)."""

    def __init__(self, n: int) -> None:
        self.n, self.c0, self.a, self.b = n, 0.0, np.zeros(n), np.zeros((n, n))

    def add(self, scale: float, u: _Width, v: _Width | None = None) -> None:
        uv = u.vector(self.n)
        if v is None:  # linear in one width
            self.c0 += scale * u.c
            self.a += scale * uv
            return
        vv = v.vector(self.n)
        self.c0 += scale * u.c * v.c
        self.a += scale * (u.c * vv + v.c * uv)
        outer = scale * np.outer(uv, vv)
        self.b += outer + outer.T  # x^T b x / 2 = scale * (u.x)(v.x)


def exact_cost_model(
    model: nn.Module, specs: list[GateSpec], example: torch.Tensor, kind: str, graph: tp.DependencyGraph | None = None
) -> CostModel:
    """The exact polynomial (`distswitch.cost`) of `count(compact)[kind]` in the groups' kept counts."""
    units = [s.units for s in specs]
    if kind == "units":
        return units_cost_model(units)
    example = example[:1].cpu()
    width_of = widths(model, specs, example, graph)
    shapes = _layer_shapes(model, example) if kind == "macs" else {}
    poly = _Quadratic(len(specs))
    counted: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, Attention) and name in shapes:
            positions, calls = shapes[name]
            poly.add(
                2.0 * positions * positions * calls,
                width_of.get((f"{name}.q", "out"), _Width(float(module.q.out_features))),
            )
            continue
        if not isinstance(module, (*COUNTED, *_NORMS)):
            continue
        w_out = width_of.get((name, "out"), _Width(float(_dense_width(module, "out"))))
        if isinstance(module, COUNTED):
            w_in = width_of.get((name, "in"), _Width(float(_dense_width(module, "in"))))
            kernel = math.prod(module.weight.shape[2:]) if isinstance(module, nn.Conv2d) else 1
            groups = getattr(module, "groups", 1)
            depthwise = groups > 1 and groups == module.in_channels == module.out_channels
            if groups > 1 and not depthwise and ((name, "out") in width_of or (name, "in") in width_of):
                raise ConfigError(
                    f"budget: {name} is a grouped convolution whose width a gated group sets; "
                    "the cost model knows depthwise ones only"
                )
            pair = (w_out, None) if depthwise else (w_out, w_in)
            per_position = kernel if depthwise else kernel / groups
            if kind == "params":
                poly.add(per_position, *pair)
                if module.bias is not None:
                    poly.add(1.0, w_out)
            elif name in shapes:
                positions, calls = shapes[name]
                poly.add(per_position * positions * calls, *pair)
        elif kind == "params":
            per_channel = sum(p.numel() for p in module.parameters(recurse=False)) / max(_dense_width(module, "out"), 1)
            if per_channel:
                poly.add(per_channel, w_out)
        counted.update(id(p) for p in module.parameters(recurse=False))
    if kind == "params":  # parameters outside these layers (a ViT's class token, embeddings): fixed
        poly.c0 += sum(p.numel() for p in model.parameters() if id(p) not in counted)
    b = tuple(tuple(float(v) for v in row) for row in poly.b)
    return CostModel(kind, tuple(units), float(poly.c0), tuple(float(v) for v in poly.a), b)
