"""What a trained engine leaves behind: the compact model (checked against the gated one before it
is saved), its size at any epoch, the factors' histograms; and `distswitch export`, the compact
model of a training checkpoint.

Every pass here runs on CPU copies in fp32, wherever and however the engine trained.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from distswitch import checkpoint
from distswitch.build import build, dense_tnn
from distswitch.config import Config, ConfigError
from distswitch.counting import count
from distswitch.data import DatasetInfo
from distswitch.engine import Engine
from distswitch.export import architecture, compact_model, save_compact
from distswitch.gates import GateSet, kept_report

# Eval outputs of the compact model must match the gated model this closely (issue #2).
EXPORT_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    pass


def cpu_twin(cfg: Config, info: DatasetInfo, engine: Engine) -> torch.nn.Module:
    """A plain fp32 copy of the engine's TNN on the CPU, in eval mode: no hooks, not compiled, no
    SyncBatchNorm, wherever and however the engine trains."""
    twin = dense_tnn(cfg, info)
    twin.load_state_dict({k: v.detach().cpu() for k, v in engine.tnn.state_dict().items()})
    return twin.eval()


def export_compact(
    cfg: Config, info: DatasetInfo, engine: Engine, epoch: int, example: torch.Tensor, path: Path
) -> dict:
    """Fold + remove, check equivalence with the gated model, save; returns the size figures.

    Both sides of the check run on CPU copies in fp32 with the same kernels: the gated reference is
    a twin of the TNN with the engine's gates and factors, never the training device's TNN (a GPU's
    convolutions default to TF32, ~5e-4 relative, 10x the tolerance), so the check does not depend
    on where training ran."""
    factors = engine.compute_factors(epoch)
    cpu_factors = [f.detach().float().cpu() for f in factors] if factors is not None else None
    example = example.to("cpu", torch.float32)  # the check runs in fp32 whatever train.precision
    reference = cpu_twin(cfg, info, engine)
    gates = GateSet(reference, engine.gates.specs)
    gates.set(cpu_factors)
    with torch.no_grad():
        expected = reference(example)
    gates.remove()
    compact = cpu_twin(cfg, info, engine)
    plan = compact_model(compact, engine.gates.specs, cpu_factors, example[:1])
    with torch.no_grad():
        diff = float((compact.eval()(example) - expected).abs().max())
    if diff > EXPORT_TOLERANCE:
        raise ExportError(
            f"compact model differs from the gated model by {diff:.2e} (> {EXPORT_TOLERANCE}); please report this"
        )
    dense = count(dense_tnn(cfg, info), example[:1])
    small = count(compact, example[:1])
    arch = architecture(cfg.model.name, info.channels, info.num_classes, info.image_size, plan, compact)
    save_compact(path, arch, compact)
    kept = kept_report(engine.gates.specs, cpu_factors)
    return {
        "kept_fraction": kept["kept_fraction"],
        "kept_units": kept["kept"],
        "gated_units": kept["units"],
        "kept_per_layer": kept["layers"],
        "dense": dense,
        "compact": small,
        "export_max_abs_diff": diff,
        "model_path": str(path),
        "widths": arch["widths"],
    }


def compact_size(cfg: Config, info: DatasetInfo, engine: Engine, epoch: int) -> dict:
    """Parameters and MACs the compact model would have after `epoch` (the export's folding and
    removal on a CPU copy, without the equivalence check). Local to the calling rank: no
    collective, no random draws, the training state untouched."""
    with torch.random.fork_rng(devices=[]):
        factors = engine.compute_factors(epoch)
        compact = cpu_twin(cfg, info, engine)
        example = torch.zeros(1, info.channels, info.image_size, info.image_size)  # sizes do not depend on values
        cpu_factors = [f.detach().cpu() for f in factors] if factors is not None else None
        compact_model(compact, engine.gates.specs, cpu_factors, example)
        return count(compact.eval(), example)


def factor_histograms(engine: Engine, epoch: int, bins: int = 20) -> dict:
    factors = engine.compute_factors(epoch)
    if factors is None:
        return {}
    out = {}
    for spec, f in zip(engine.gates.specs, factors):
        values = f.detach().float().cpu().numpy().ravel()
        # Units at exactly 0 are off (removed by the export): counted apart, not in the first bin.
        counts, edges = np.histogram(values[values > 0], bins=bins)
        out[spec.layer] = {"zeros": int((values == 0).sum()), "counts": counts.tolist(), "edges": edges.tolist()}
    return out


def export_checkpoint(path: str | Path, out: str | Path) -> dict:
    """`distswitch export`: the compact model of a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist; pass e.g. outputs/run/checkpoints/best.pt")
    try:
        saved = checkpoint.read(path)
    except Exception as exc:  # a truncated or foreign file: say which, not a pickle traceback
        raise ConfigError(
            f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}); pass a distswitch checkpoint"
        ) from None
    if not isinstance(saved, dict) or saved.get("format") != checkpoint.CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{str(path)!r} is not a distswitch training checkpoint (expected format {checkpoint.CHECKPOINT_FORMAT})"
        )
    cfg = Config.from_dict(saved["config"])
    # One pass on CPU: compiling would cost more than it saves, and NHWC buys nothing there.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile="none", channels_last=False))
    info = DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["data_info"].items()})
    device = torch.device("cpu")
    tnn, gates, method = build(cfg, info, saved["steps_per_epoch"], device)
    engine = Engine(cfg, tnn, gates, method, device)
    engine.load_state_dict(saved["engine"])
    if engine.compute_factors(saved["epoch"]) is None:
        why = "a dense warm-up epoch" if method.source is not None else f"method {cfg.method!r} has none"
        raise ConfigError(
            f"checkpoint {str(path)!r} has no switcher factors ({why}): nothing to compact; "
            "pass a checkpoint of a switched epoch, e.g. <out_dir>/checkpoints/best.pt"
        )
    torch.manual_seed(0)
    example = torch.randn(8, info.channels, info.image_size, info.image_size)
    return export_compact(cfg, info, engine, saved["epoch"], example, Path(out))
