"""The compact model: fold positive factors into the weights, remove switched-off units.

Removal uses Torch-Pruning's dependency graph, so coupled channels (residual additions, depthwise
convolutions) are removed as groups. A unit is removed only where that is exact:

- ``out`` gates: a unit group's factor is 0 (one factor scales every layer writing the group's
  channel, so a residual stream channel goes from every block at once);
- ``in`` gates: the features are read by the gated Linear alone and made by some layer, which then
  stops making them (the model's own input is never trimmed);
- ``weight`` gates: connections are zeroed in place (unstructured sparsity; dense shapes stay).

The result is a plain nn.Module built from the registry; it is saved as a state dict plus an
architecture JSON (model name, shapes, the removal plan), so loading unpickles none of our classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from distswitch.coupling import dependency_graph
from distswitch.gates import GateSpec
from distswitch.io import save_torch, write_json
from distswitch.models import create_tnn

FORMAT = "distswitch.compact/2"  # 2: layers by name
_OUT_HANDLERS = {"conv": tp.prune_conv_out_channels, "linear": tp.prune_linear_out_channels}
_IN_HANDLERS = {"conv": tp.prune_conv_in_channels, "linear": tp.prune_linear_in_channels}
_PRODUCERS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_depthwise_conv_out_channels)
_CONSUMERS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels, tp.prune_depthwise_conv_in_channels)


@torch.no_grad()
def fold_factors(model: nn.Module, specs: list[GateSpec], factors: list[torch.Tensor]) -> None:
    """Multiply each factor into the affine parameters it scales, in place (no hooks needed after)."""
    modules = dict(model.named_modules())
    for spec, f in zip(specs, factors):
        f = f.detach().to(modules[spec.layer].weight)
        if spec.side == "weight":
            modules[spec.layer].weight.mul_(f)
        elif spec.side == "in":
            modules[spec.layer].weight.mul_(f[None, :])
        else:
            f = f.repeat_interleave(spec.rows)  # an attention head's factor scales its rows of v
            for _, point_name in spec.members:
                point = modules[point_name]
                point.weight.mul_(f.view(-1, *([1] * (point.weight.dim() - 1))))
                if point.bias is not None:
                    point.bias.mul_(f)


def _kind(module: nn.Module) -> str:
    return "conv" if isinstance(module, nn.Conv2d) else "linear"


def removal_plan(
    model: nn.Module, specs: list[GateSpec], factors: list[torch.Tensor], example: torch.Tensor
) -> list[dict]:
    """[{"layer", "dim": "out"|"in"|"heads", "idxs"}]: the exact removals, one entry per unit group."""
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    graph = None
    plan = []
    for spec, f in zip(specs, factors):
        if spec.side == "weight":
            continue
        idxs = torch.nonzero(f.detach() == 0).flatten().tolist()
        if not idxs:
            continue
        layer = modules[spec.layer]
        if spec.heads_of:
            plan.append({"layer": spec.heads_of, "dim": "heads", "idxs": _leave_one(idxs, spec.units)})
            continue
        if spec.side == "out":
            plan.append({"layer": spec.layer, "dim": "out", "idxs": _leave_one(idxs, spec.units)})
            continue
        graph = graph or dependency_graph(model, example)
        group = graph.get_pruning_group(layer, _IN_HANDLERS[_kind(layer)], idxs=idxs)
        consumers = {names[d.target.module] for d, _ in group if d.handler in _CONSUMERS}
        has_producer = any(d.handler in _PRODUCERS for d, _ in group)
        if consumers == {spec.layer} and has_producer:
            plan.append({"layer": spec.layer, "dim": "in", "idxs": _leave_one(idxs, spec.units)})
    return plan


def _leave_one(idxs: list[int], units: int) -> list[int]:
    """A layer switched off entirely keeps one (all-zero) unit: its output stays exactly 0 and the
    network keeps valid shapes (a 0-channel conv cannot run)."""
    return idxs[1:] if len(idxs) >= units else idxs


def apply_plan(model: nn.Module, plan: list[dict], example: torch.Tensor) -> None:
    """Remove the planned units in place (also used to rebuild a saved compact model's shapes):
    attention heads by their module, then every channel group through one dependency graph."""
    modules = dict(model.named_modules())
    for item in plan:
        if item["dim"] == "heads":
            modules[item["layer"]].prune_heads(list(item["idxs"]))
    channels = [item for item in plan if item["dim"] != "heads"]
    if not channels:
        return
    modules = dict(model.named_modules())
    graph = dependency_graph(model, example)
    groups = []
    for item in channels:
        layer = modules[item["layer"]]
        handlers = _OUT_HANDLERS if item["dim"] == "out" else _IN_HANDLERS
        groups.append(graph.get_pruning_group(layer, handlers[_kind(layer)], idxs=list(item["idxs"])))
    for group in groups:
        group.prune()


def compact_model(
    model: nn.Module, specs: list[GateSpec], factors: list[torch.Tensor] | None, example: torch.Tensor
) -> list[dict]:
    """Turn a plain (hook-free) copy of the TNN into the compact network in place; returns the plan."""
    if factors is None:
        return []
    model.eval()
    fold_factors(model, specs, factors)
    plan = removal_plan(model, specs, factors, example)
    apply_plan(model, plan, example)
    return plan


def architecture(
    model_name: str, in_channels: int, num_classes: int, image_size: int, plan: list[dict], compact: nn.Module
) -> dict:
    widths = {n: int(m.weight.shape[0]) for n, m in compact.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return {
        "format": FORMAT,
        "model": model_name,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "image_size": image_size,
        "plan": plan,
        "widths": widths,
    }


def save_compact(path: str | Path, arch: dict, model: nn.Module) -> None:
    """model.pt (state dict + architecture JSON string) and model.arch.json beside it, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch({"format": FORMAT, "arch": json.dumps(arch), "state_dict": model.state_dict()}, path)
    write_json(path.with_suffix(".arch.json"), arch)


def load_compact(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a compact model from the registry and its plan; needs no pickle (weights_only)."""
    bundle = torch.load(path, map_location=map_location, weights_only=True)
    if bundle.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a distswitch compact model (format {bundle.get('format')!r}, expected {FORMAT!r})"
        )
    arch = json.loads(bundle["arch"])
    model = create_tnn(arch["model"], arch["in_channels"], arch["num_classes"], arch["image_size"])
    example = torch.zeros(1, arch["in_channels"], arch["image_size"], arch["image_size"])
    apply_plan(model, arch["plan"], example)
    model.load_state_dict(bundle["state_dict"])
    return model.eval()
