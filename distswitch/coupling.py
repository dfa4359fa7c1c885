"""Which channels of a network must go together: Torch-Pruning's dependency graph, read for the
layers that write a coupled group (a residual stream's blocks and shortcuts, a depthwise conv after
its producer) and for the layers that read it (and which of their input channels carry each unit)."""

from __future__ import annotations

import warnings

import torch
import torch_pruning as tp
from torch import nn

from distswitch.models.vit import Attention


def dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's graph of which channels must go together. It traces through autograd: built
    with grad on, so that it works inside a caller's torch.no_grad() too."""
    with torch.enable_grad(), warnings.catch_warnings():
        # A ViT's class token and position embedding: their groups (the residual stream) are not gated.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example.cpu())


# (reader layer name, index [units, per_unit] into the reader's input channels)
Readers = list[tuple[str, torch.Tensor]]
_IN_CHANNELS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


def find_readers(
    model: nn.Module, specs: list, example: torch.Tensor, graph: tp.DependencyGraph | None = None
) -> list[Readers]:
    """For each ``out`` gate (a `distswitch.gates.GateSpec`), the layers that read its units and which of their input channels
    carry unit i (flattening maps one channel to several features); [] for other sides."""
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    out: list[Readers] = []
    for spec in specs:
        if spec.side != "out":
            out.append([])
            continue
        if spec.heads_of:  # an attention head: read by the output projection's columns of its rows
            rows = torch.arange(spec.units * spec.rows).view(spec.units, spec.rows)
            out.append([(f"{spec.heads_of}.proj", rows)])
            continue
        if graph is None:  # built once, and only where some gate needs it
            graph = dependency_graph(model, example)
        layer = modules[spec.layer]
        handler = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
        group = graph.get_pruning_group(layer, handler, idxs=list(range(spec.units)))
        readers: Readers = []
        for item in group.items:
            if item.dep.handler not in _IN_CHANNELS or item.dep.target.module not in names:
                continue
            idxs, roots = torch.tensor(item.idxs), torch.tensor(item.root_idxs)
            per = len(idxs) // spec.units
            if per * spec.units != len(idxs) or torch.bincount(roots, minlength=spec.units).ne(per).any():
                continue  # an uneven mapping (not seen in the registered models): no outgoing view from it
            order = torch.argsort(roots, stable=True)
            readers.append((names[item.dep.target.module], idxs[order].view(spec.units, per)))
        out.append(readers)
    return out


_PRODUCERS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_depthwise_conv_out_channels)


# What a gated group may hold besides tp's own op nodes: a group reaching anything else (a ViT's
# class token and position embedding, an nn.MultiheadAttention) is not gated.
_GATEABLE = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def coupled_writers(graph: tp.DependencyGraph, model: nn.Module, name: str) -> tuple[list[str], bool]:
    """The layers whose output channels are coupled with `name`'s (it first, then in model order),
    and whether the group can be gated: every member a conv, linear or norm layer (or tp's op nodes)
    and no attention layer's q/k/v/projection (heads are their units)."""
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    layer = modules[name]
    handler = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
    group = graph.get_pruning_group(layer, handler, idxs=list(range(layer.weight.shape[0])))
    names = {m: n for n, m in modules.items()}
    found = {names[d.target.module] for d, _ in group if d.handler in _PRODUCERS and d.target.module in names}
    in_attention = {
        f"{n}.{part}" for n, m in modules.items() if isinstance(m, Attention) for part in ("q", "k", "v", "proj")
    }
    gateable = all(
        type(d.target.module).__module__ == tp.ops.__name__
        or (isinstance(d.target.module, _GATEABLE) and names.get(d.target.module) not in in_attention)
        for d, _ in group
    )
    return [name, *sorted(found - {name}, key=order.get)], gateable
