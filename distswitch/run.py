"""One training run on one process: data -> TNN + gates -> method -> engine -> select -> test -> export.

Model selection uses the validation split only; the test split is evaluated once, on the selected
model, and reported as measured.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from distswitch.config import Config, ConfigError
from distswitch.data import DATASETS, BatchLoader, DatasetInfo, load_splits
from distswitch.engine import Engine, EpochStats
from distswitch.export import architecture, atomic_save, compact_model, count, save_compact
from distswitch.gates import GateSet, find_gates, kept_report
from distswitch.methods import METHODS, build_method
from distswitch.models import MODELS, create_tnn
from distswitch.switcher import SWITCHERS

CHECKPOINT_FORMAT = "distswitch.ckpt/1"
# Eval outputs of the compact model must match the gated model this closely (issue #2).
EXPORT_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    pass


def validate_names(cfg: Config) -> None:
    """Registry-backed names, checked before any work starts (raises UnknownNameError)."""
    MODELS.get(cfg.model.name)
    DATASETS.get(cfg.data.dataset)
    METHODS.get(cfg.method)
    SWITCHERS.get(cfg.switcher.arch)


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(cfg.train.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(cfg: Config, info: DatasetInfo, steps_per_epoch: int, device: torch.device):
    """TNN, its gates and the method (with its factor source), on `device`."""
    tnn = create_tnn(cfg.model.name, info.channels, info.num_classes, info.image_size).to(device)
    specs = find_gates(tnn, cfg.model.gated, cfg.switcher.granularity)
    gates = GateSet(tnn, specs)
    method = build_method(cfg, specs, steps_per_epoch)
    if method.source is not None:
        method.source.to(device)
    return tnn, gates, method


def _progress(cfg: Config):
    if not cfg.train.progress:
        return None

    def bar(loader, epoch):
        return tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step", leave=True,
                    dynamic_ncols=True, file=sys.stderr)

    return bar


def train(cfg: Config, summary_json: str | Path | None = None) -> dict:
    """Train, select on validation, test once, export the compact model; returns the summary."""
    validate_names(cfg)
    device = resolve_device(cfg)
    out = Path(cfg.out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    seed_everything(cfg.train.seed)

    splits = load_splits(cfg.data)
    info = splits.info
    train_loader = BatchLoader(splits.train, info, cfg.train.batch_size, train=True, seed=cfg.train.seed,
                               augment=cfg.data.augment, num_workers=cfg.data.num_workers)
    val_loader = BatchLoader(splits.val, info, cfg.train.eval_batch_size, train=False)
    test_loader = BatchLoader(splits.test, info, cfg.train.eval_batch_size, train=False)

    tnn, gates, method = build(cfg, info, len(train_loader), device)
    engine = Engine(cfg, tnn, gates, method, device)
    best = {"val_acc": -1.0, "epoch": None}
    history: list[EpochStats] = []

    def on_epoch_end(stats: EpochStats) -> None:
        history.append(stats)
        bundle = checkpoint_bundle(cfg, info, engine, stats.epoch, len(train_loader), history)
        atomic_save(bundle, out / "checkpoints" / "last.pt")
        if stats.selectable and stats.val_acc > best["val_acc"]:
            best.update(val_acc=stats.val_acc, epoch=stats.epoch)
            tmp = out / "checkpoints" / "best.pt.tmp"
            shutil.copyfile(out / "checkpoints" / "last.pt", tmp)  # the same bundle: copy, not re-serialise
            os.replace(tmp, out / "checkpoints" / "best.pt")
        print(_epoch_line(cfg, stats), file=sys.stderr, flush=True)

    engine.fit(train_loader, val_loader, on_epoch_end=on_epoch_end, progress=_progress(cfg))

    selected = torch.load(out / "checkpoints" / "best.pt", map_location=device, weights_only=True)
    engine.load_state_dict(selected["engine"])
    epoch = selected["epoch"]
    test_loss, test_acc = engine.evaluate(test_loader, epoch)
    example = next(iter(val_loader))[0][:8]
    export = export_compact(cfg, info, engine, epoch, example, out / "model.pt")

    summary = {
        "model": cfg.model.name,
        "method": cfg.method,
        "dataset": cfg.data.dataset,
        "device": str(device),
        "selected_epoch": epoch,
        "val_acc": best["val_acc"],
        "test_acc": test_acc,
        "test_loss": test_loss,
        **export,
        "seconds_per_epoch": float(np.mean([h.seconds for h in history])),
        "images_per_s": float(np.mean([h.images_per_s for h in history])),
        "train_examples": len(splits.train),
        "git_sha": _git_sha(),
        "torch": torch.__version__,
        "out_dir": str(out),
        "history": [h.to_dict() for h in history],
        "config": cfg.to_dict(),
    }
    _write_json(out / "summary.json", summary)
    if summary_json is not None:
        _write_json(Path(summary_json), summary)
    return summary


def export_compact(cfg: Config, info: DatasetInfo, engine: Engine, epoch: int, example: torch.Tensor,
                   path: Path) -> dict:
    """Fold + remove, check equivalence with the gated model, save; returns the size figures."""
    factors = engine.compute_factors(epoch)
    engine.gates.set(factors)
    engine.tnn.eval()
    example = example.to(engine.device)
    with torch.no_grad():
        reference = engine.tnn(example).cpu()
    compact = create_tnn(cfg.model.name, info.channels, info.num_classes, info.image_size)
    compact.load_state_dict({k: v.cpu() for k, v in engine.tnn.state_dict().items()})
    cpu_factors = [f.detach().cpu() for f in factors] if factors is not None else None
    plan = compact_model(compact, engine.gates.specs, cpu_factors, example[:1].cpu())
    with torch.no_grad():
        diff = float((compact.eval()(example.cpu()) - reference).abs().max())
    if diff > EXPORT_TOLERANCE:
        raise ExportError(f"compact model differs from the gated model by {diff:.2e} (> {EXPORT_TOLERANCE}); please report this")
    dense = count(create_tnn(cfg.model.name, info.channels, info.num_classes, info.image_size), example[:1].cpu())
    small = count(compact, example[:1].cpu())
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


def checkpoint_bundle(cfg: Config, info: DatasetInfo, engine: Engine, epoch: int, steps_per_epoch: int,
                      history: list[EpochStats]) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "data_info": asdict(info),
        "epoch": epoch,
        "steps_per_epoch": steps_per_epoch,
        "engine": engine.state_dict(),
        "history": [h.to_dict() for h in history],
        "torch_rng": torch.get_rng_state(),
    }


def export_checkpoint(path: str | Path, out: str | Path) -> dict:
    """`distswitch export`: the compact model of a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist; pass e.g. outputs/run/checkpoints/best.pt")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, not a pickle traceback
        raise ConfigError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}); pass a distswitch checkpoint") from None
    if not isinstance(bundle, dict) or bundle.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{str(path)!r} is not a distswitch training checkpoint (expected format {CHECKPOINT_FORMAT})")
    cfg = Config.from_dict(bundle["config"])
    info = DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in bundle["data_info"].items()})
    device = torch.device("cpu")
    tnn, gates, method = build(cfg, info, bundle["steps_per_epoch"], device)
    engine = Engine(cfg, tnn, gates, method, device)
    engine.load_state_dict(bundle["engine"])
    torch.manual_seed(0)
    example = torch.randn(8, info.channels, info.image_size, info.image_size)
    return export_compact(cfg, info, engine, bundle["epoch"], example, Path(out))


def _epoch_line(cfg: Config, s: EpochStats) -> str:
    losses = " ".join(f"{ph}/loss={v:.4f}" for ph, v in s.train_loss.items())
    return (f"epoch {s.epoch + 1}/{cfg.train.epochs} {losses} val/acc={s.val_acc:.4f} "
            f"kept={s.kept_fraction:.3f} ({s.seconds:.1f}s, {s.images_per_s:.0f} img/s)")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
