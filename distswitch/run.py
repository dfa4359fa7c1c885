"""One training run, as one worker of a launch: data -> TNN + gates -> method -> engine -> select ->
test -> export.

Model selection uses the validation split only; the test split is evaluated once, on the selected
model, and reported as measured. No Ray here: the launcher passes a `Session` (checkpoints in and
out, metrics) and has set up the process group that `distswitch.parallel` uses.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distswitch.config import Config, ConfigError, channels_last_on
from distswitch.data import DATASETS, DatasetInfo, check_data, make_loaders
from distswitch.engine import Engine, EpochStats, TrainingStopped
from distswitch.cost import CostModel
from distswitch.export import architecture, compact_model, count, fit_cost_model, save_compact
from distswitch.gates import GateSet, GateSpec, find_gates, find_readers, kept_report
from distswitch.io import copy_file, copy_tree, save_torch, write_json
from distswitch.methods import METHODS, build_method
from distswitch.methods.base import min_units
from distswitch.models import MODELS, create_tnn
from distswitch.optim import OPTIMIZERS, SCHEDULERS
from distswitch.parallel import DDPReplicas, Replicas, state_digest
from distswitch.switcher import SWITCHERS
from distswitch.tracking import git_sha

CHECKPOINT_FORMAT = "distswitch.ckpt/1"
# In a checkpoint folder: training stopped for good (TrainingStopped) after that folder's state.
STOPPED_FILE, STOPPED_METRIC = "stopped.json", "stopped"
# The final report's folder -> where its files land in out_dir.
FINAL_FILES = {"summary.json": "summary.json", "model.pt": "model.pt", "model.arch.json": "model.arch.json",
               "best.pt": "checkpoints/best.pt"}
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
    for phase in ("tnn", "snn"):
        section = getattr(cfg.optim, phase)
        OPTIMIZERS.get(section.name, f"optim.{phase}.name")
        SCHEDULERS.get(section.scheduler, f"optim.{phase}.scheduler")


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


def build(cfg: Config, info: DatasetInfo, steps_per_epoch: int, device: torch.device, sync_batchnorm: bool = False):
    """TNN, its gates and the method (with its factor source), on `device`."""
    tnn = create_tnn(cfg.model.name, info.channels, info.num_classes, info.image_size)
    if sync_batchnorm:  # before the gates: their hooks attach to the modules that will run
        tnn = torch.nn.SyncBatchNorm.convert_sync_batchnorm(tnn)
    tnn = tnn.to(device)
    if channels_last_on(cfg.train):
        tnn = tnn.to(memory_format=torch.channels_last)  # 4-d weights only
    specs = find_gates(tnn, cfg.model.gated, cfg.switcher.granularity)
    example = torch.zeros(1, info.channels, info.image_size, info.image_size)
    plain = create_tnn(cfg.model.name, info.channels, info.num_classes, info.image_size)  # same names, on CPU
    gates = GateSet(tnn, specs, find_readers(plain, specs, example))
    method = build_method(cfg, specs, steps_per_epoch, budget_cost_model(cfg, info, specs, example))
    smallest = min(specs, key=lambda spec: spec.units, default=None)
    if method.source is not None and smallest is not None and cfg.switcher.min_kept > smallest.units:
        raise ConfigError(f"switcher.min_kept: got {cfg.switcher.min_kept}; layer {smallest.layer} has only "
                          f"{smallest.units} units; use at most {smallest.units}")
    if method.source is not None:
        method.source.to(device)
    return tnn, gates, method


def budget_cost_model(cfg: Config, info: DatasetInfo, specs: list[GateSpec], example: torch.Tensor) -> CostModel | None:
    """The cost model of `budget.kind` (None without a budget); a budget no cut can meet is refused."""
    b = cfg.budget
    if b.fraction is None or cfg.method == "dense":
        return None
    cost = fit_cost_model(lambda: create_tnn(cfg.model.name, info.channels, info.num_classes, info.image_size),
                          specs, example, b.kind)
    floor = cost.floor(min_units(cfg, specs)) / cost.dense
    if floor > b.fraction + 0.01:
        raise ConfigError(f"budget.fraction: {b.fraction} of the dense {b.kind} cannot be met by {cfg.model.name}: "
                          f"keeping switcher.min_kept={max(1, cfg.switcher.min_kept)} unit(s) per gated layer already "
                          f"costs {floor:.3f}; use budget.fraction >= {floor:.3f}")
    return cost


def preflight(cfg: Config) -> None:
    """What only fails once data is loaded (missing data, a batch larger than the split, gates that
    select nothing), checked in this process on CPU: seconds instead of a cluster start-up."""
    validate_names(cfg)
    info, steps = check_data(cfg, cfg.distributed.num_workers)
    build(cfg, info, steps, torch.device("cpu"))


class Session:
    """What a training run needs from whatever launched it; this one is a single local process.

    `distswitch.launch` provides the Ray Train version (one per worker). A session saves checkpoint
    folders and hands back the latest one on restart; `report` is called by every worker the same
    number of times (a collective under Ray), with a folder from rank 0 only.
    """

    rank = 0
    world_size = 1

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir) / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.root.glob("epoch_*"))
        return found[-1] if found else None

    def report(self, metrics: dict, checkpoint: Path | None, name: str) -> None:
        if checkpoint is not None and name == "final":
            collect_final(checkpoint, self.root.parent)
        elif checkpoint is not None:
            copy_tree(checkpoint, self.root / name)

    def progress(self, total: int, desc: str):
        from tqdm import tqdm  # here: the engine, export and checkpoints need no progress bars (gpu_check)

        return tqdm(total=total, desc=desc, unit="step", leave=True, dynamic_ncols=True, file=sys.stderr)

    def close(self) -> None:
        """The run is over on this worker (finished, stopped or failed): drop local copies."""


def collect_final(folder: Path, out: Path) -> None:
    """Copy a final report's files into out_dir, each atomically."""
    missing = [name for name in FINAL_FILES if not (Path(folder) / name).is_file()]
    if missing:
        raise RuntimeError(f"the final checkpoint {folder} lacks {', '.join(missing)}")
    for name, dest in FINAL_FILES.items():
        copy_file(Path(folder) / name, Path(out) / dest)


def _progress(cfg: Config, session: Session):
    if not cfg.train.progress or session.rank != 0:
        return None
    return lambda loader, epoch: session.progress(len(loader), f"epoch {epoch + 1}/{cfg.train.epochs}")


def make_replicas(tnn: torch.nn.Module, method, device: torch.device) -> Replicas:
    """DDP replicas when a process group of several workers exists. One worker has nothing to
    all-reduce: the plain modules skip DDP's per-step bucket bookkeeping and buffer broadcasts."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DDPReplicas(tnn, method.source, method.source_phase, device)
    return Replicas(tnn, method.source)


def train(cfg: Config, session: Session | None = None, device: torch.device | None = None,
          launched_at: float | None = None, marks: dict[str, float] | None = None, tracker=None) -> dict:
    """Train (resuming from the session's latest checkpoint), select on validation, test once and
    export; returns the summary (complete on rank 0). Rank 0's final report carries
    summary.json, model.pt (the compact model) and best.pt. `launched_at` (wall clock of the
    launching process's start) gives the summary's start-up overhead, launch to first step, and
    its timeline (`marks`: the launcher's own wall-clock marks, then this worker's). `tracker`
    (rank 0 only, `tracking.EpochLogger`) gets each epoch's metrics once its checkpoint is reported."""
    marks = {**(marks or {}), "worker_started": time.time()}
    session = session or Session(cfg.out_dir)
    scratch = Path(tempfile.mkdtemp(prefix="distswitch-"))  # this worker's local files (rank 0's best.pt)
    try:
        return _train(cfg, session, device, launched_at, marks, tracker, scratch)
    finally:  # a stop or an error too: only a killed worker leaves its scratch behind
        shutil.rmtree(scratch, ignore_errors=True)
        session.close()


def _train(cfg: Config, session: Session, device: torch.device | None, launched_at: float | None,
           marks: dict[str, float], tracker, scratch: Path) -> dict:
    validate_names(cfg)
    device = device or resolve_device(cfg)
    rank, world = session.rank, session.world_size
    seed_everything(cfg.train.seed)
    # Shapes are fixed for a run: let cuDNN pick the fastest kernels (a process setting; workers
    # are processes of their own).
    torch.backends.cudnn.benchmark = device.type == "cuda"

    loaders = make_loaders(cfg, rank, world, device)
    info, train_loader, val_loader, test_loader = loaders.info, loaders.train, loaders.val, loaders.test
    marks["data_loaded"] = time.time()

    tnn, gates, method = build(cfg, info, len(train_loader), device, sync_batchnorm=cfg.distributed.sync_batchnorm and world > 1)
    marks["model_built"] = time.time()
    replicas = make_replicas(tnn, method, device)
    marks["replicas_ready"] = time.time()  # DDP wrappers built, rank 0's parameters broadcast
    engine = Engine(cfg, tnn, gates, method, device, replicas)
    history: list[EpochStats] = []
    best = {"val_acc": -1.0, "epoch": None}
    start_epoch = 0
    latest = session.latest_checkpoint()
    if latest is not None and (Path(latest) / STOPPED_FILE).is_file() and rank == 0:
        print(f"the last attempt stopped: {json.loads((Path(latest) / STOPPED_FILE).read_text())['message']}",
              file=sys.stderr, flush=True)
    if latest is not None and not (Path(latest) / "state.pt").is_file():
        latest = None  # a stop before the first epoch checkpoint: nothing to resume
    if latest is not None:
        state = read_checkpoint(Path(latest) / "state.pt")
        _check_resumable(cfg, state, latest)
        engine.load_state_dict(state["engine"])
        engine.retune(state["config"]["optim"])
        history = [EpochStats(**h) for h in state["history"]]
        best = dict(state["best"])
        start_epoch = state["epoch"] + 1
        _set_rng(state["rng"], rank)
        if rank == 0 and (Path(latest) / "best.pt").is_file():
            shutil.copyfile(Path(latest) / "best.pt", scratch / "best.pt")
        if rank == 0:
            print(f"resuming from {latest} after epoch {start_epoch}/{cfg.train.epochs}", file=sys.stderr, flush=True)

    dense_size = count(create_tnn(cfg.model.name, info.channels, info.num_classes, info.image_size),
                       torch.zeros(1, info.channels, info.image_size, info.image_size)) if tracker is not None else {}

    def on_epoch_end(stats: EpochStats) -> None:
        history.append(stats)
        is_best = stats.selectable and stats.val_acc > best["val_acc"]
        if is_best:  # val_acc is summed over workers: every rank takes the same decision
            best.update(val_acc=stats.val_acc, epoch=stats.epoch)
        last = stats.epoch == cfg.train.epochs - 1
        checkpoint = (stats.epoch + 1) % cfg.distributed.checkpoint_every == 0 or last
        rng = replicas.gather(_rng_state()) if checkpoint else None
        if checkpoint:  # replicas must be identical; a checkpoint of diverged workers is worthless
            stats.replica_digests = replicas.gather(state_digest(tnn, method.source))
            if len(set(stats.replica_digests)) > 1:
                raise RuntimeError(f"worker replicas diverged by the end of epoch {stats.epoch + 1} "
                                   f"(parameter digests {stats.replica_digests}); please report this")
        folder = None
        if rank == 0:
            print(_epoch_line(cfg, stats), file=sys.stderr, flush=True)
            if is_best or checkpoint:
                bundle = checkpoint_bundle(cfg, info, engine, stats.epoch, len(train_loader), history, best, rng)
            if is_best:
                save_torch(bundle, scratch / "best.pt")
            if checkpoint:
                folder = scratch / f"epoch_{stats.epoch:04d}"
                folder.mkdir()
                save_torch(bundle, folder / "state.pt")
                if (scratch / "best.pt").is_file():
                    shutil.copyfile(scratch / "best.pt", folder / "best.pt")
        metrics = epoch_metrics(stats)
        metrics["tune/score"] = stats.val_acc - cfg.tune.kept_weight * stats.kept_fraction  # `distswitch tune`'s trade-off
        session.report(metrics, folder, f"epoch_{stats.epoch:04d}")
        if tracker is not None:
            # The compact size is a CPU pass over the whole TNN: at checkpoint epochs only (a GPU epoch
            # can be shorter than the pass).
            size = compact_size(cfg, info, engine, stats.epoch) if checkpoint else None
            tracker.log(tracking_metrics(stats, size, dense_size), stats.epoch)
        if folder is not None:  # rank 0 keeps the latest checkpoint's files for a stop (below)
            if last_checkpoint:
                shutil.rmtree(last_checkpoint.pop(), ignore_errors=True)
            last_checkpoint.append(folder)

    last_checkpoint: list[Path] = []
    try:
        engine.fit(train_loader, val_loader, start_epoch=start_epoch, on_epoch_end=on_epoch_end,
                   progress=_progress(cfg, session))
    except TrainingStopped as exc:
        _report_stop(session, exc, scratch, last_checkpoint, latest, replicas)
        raise

    # The selected model: rank 0 holds it, every worker gets it (the test split is sharded).
    epoch = best["epoch"]
    if rank == 0:
        selected = read_checkpoint(scratch / "best.pt")
        engine.load_state_dict(selected["engine"])
    replicas.broadcast_state()
    test_loss, test_acc = engine.evaluate(test_loader, epoch)
    summary = {}
    final = scratch / "final"
    if rank == 0:
        final.mkdir()
        example = loaders.example()
        export = export_compact(cfg, info, engine, epoch, example, final / "model.pt")
        export["model_path"] = str(Path(cfg.out_dir) / "model.pt")  # where the launcher puts it
        summary = {
            "model": cfg.model.name,
            "method": cfg.method,
            "dataset": cfg.data.dataset,
            "device": str(device),
            "workers": world,
            "selected_epoch": epoch,
            # Epoch this worker group started at: > 0 after a restart or a relaunch (resume).
            "resumed_at_epoch": start_epoch,
            "val_acc": best["val_acc"],
            "test_acc": test_acc,
            "test_loss": test_loss,
            **export,
            "startup_seconds": (engine.first_step_at - launched_at
                                if launched_at is not None and engine.first_step_at is not None else None),
            "startup_origin": launched_at,  # wall clock (time.time) of the timeline's 0
            "startup_timeline": ({k: round(v - launched_at, 2) for k, v in
                                  {**marks, "first_step": engine.first_step_at or float("nan")}.items()}
                                 if launched_at is not None else {}),
            "seconds_per_epoch": float(np.mean([h.seconds for h in history])),
            "images_per_s": float(np.mean([h.images_per_s for h in history])),
            "comm_bytes_per_step": history[-1].comm_bytes_per_step if history else {},
            "train_examples": loaders.train_examples,
            "data_loader": cfg.data.loader,
            "git_sha": git_sha(),
            "factor_histograms": factor_histograms(engine, epoch),
            "torch": torch.__version__,
            "out_dir": str(cfg.out_dir),
            "history": [h.to_dict() for h in history],
            "config": cfg.to_dict(),
        }
        write_json(final / "summary.json", summary)
        shutil.copyfile(scratch / "best.pt", final / "best.pt")
        if engine.first_step_at is not None and launched_at is not None:
            print(f"start-up: {summary['startup_seconds']:.1f} s from launch to the first step", file=sys.stderr, flush=True)
    # The selected epoch's validation figures ride along: a search ranks trials on every report.
    selected = next((h for h in history if h.epoch == epoch), history[-1])
    final_metrics = {"test/acc": test_acc, "test/loss": test_loss, "epoch": cfg.train.epochs - 1,
                     "val/acc": best["val_acc"], "kept_fraction": selected.kept_fraction,
                     "tune/score": best["val_acc"] - cfg.tune.kept_weight * selected.kept_fraction}
    session.report(final_metrics, final if rank == 0 else None, "final")
    return summary


def _report_stop(session: Session, exc: TrainingStopped, scratch: Path, last_checkpoint: list[Path],
                 restored: Path | None, replicas: Replicas) -> None:
    """A stop for good becomes the run's latest checkpoint: the last good epoch's files (so the same
    command, with e.g. a lower learning rate, resumes from them) plus stopped.json with the reason.
    Every worker calls it (the stop is decided on all-reduced figures)."""
    token = replicas.gather(uuid.uuid4().hex[:8])[0]  # rank 0's: one folder name on every worker
    folder = None
    if session.rank == 0:
        folder = scratch / f"stopped_{token}"
        source = last_checkpoint[-1] if last_checkpoint else restored
        if source is not None and (Path(source) / "state.pt").is_file():
            shutil.copytree(source, folder, ignore=shutil.ignore_patterns(STOPPED_FILE))
        folder.mkdir(exist_ok=True)
        write_json(folder / STOPPED_FILE, {"message": str(exc)})
    session.report({STOPPED_METRIC: str(exc)}, folder, f"stopped_{token}")


def epoch_metrics(s: EpochStats) -> dict:
    """Flat per-epoch metrics (what Ray Train records; MLflow-style names)."""
    m = {"epoch": s.epoch, "val/acc": s.val_acc, "val/loss": s.val_loss, "kept_fraction": s.kept_fraction,
         "seconds": s.seconds, "images_per_s": s.images_per_s}
    for ph, v in s.train_loss.items():
        m[f"{ph}/loss"] = v
    for ph, v in s.train_acc.items():
        m[f"{ph}/acc"] = v
    for ph, v in s.lr.items():
        m[f"{ph}/lr"] = v
    for ph, v in s.comm_bytes_per_step.items():
        m[f"{ph}/comm_bytes_per_step"] = v
    return m


def _check_resumable(cfg: Config, state: dict, where) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{where} is not a distswitch checkpoint (format {state.get('format')!r}); "
                          "use another distributed.name or storage_path")
    old = Config.from_dict(state["config"])
    for key in ("model", "method", "switcher", "data"):
        if getattr(old, key) != getattr(cfg, key):
            raise ConfigError(f"{key}: differs from the checkpoint at {where} that this run would resume; "
                              "use another distributed.name (or out_dir) for a new run")


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Tensors and plain values only: checkpoints load with weights_only=True.
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint bundle with every tensor on the CPU, whatever device trained or resumes it:
    `load_state_dict` places model and optimiser state on the device, while RNG states must stay
    CPU ByteTensors (`torch.set_rng_state` refuses others) and optimiser step counters on the host
    (on a GPU each would cost a host sync per parameter per step)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _set_rng(states: list[dict] | None, rank: int) -> None:
    """This rank's generators as saved (rank 0's when the run had fewer workers); `states` as
    `read_checkpoint` gives them (on the CPU)."""
    if not states:
        return
    state = states[rank] if rank < len(states) else states[0]
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def cpu_twin(cfg: Config, info: DatasetInfo, engine: Engine) -> torch.nn.Module:
    """A plain fp32 copy of the engine's TNN on the CPU, in eval mode: no hooks, not compiled, no
    SyncBatchNorm, wherever and however the engine trains."""
    twin = create_tnn(cfg.model.name, info.channels, info.num_classes, info.image_size)
    twin.load_state_dict({k: v.detach().cpu() for k, v in engine.tnn.state_dict().items()})
    return twin.eval()


def export_compact(cfg: Config, info: DatasetInfo, engine: Engine, epoch: int, example: torch.Tensor,
                   path: Path) -> dict:
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
        raise ExportError(f"compact model differs from the gated model by {diff:.2e} (> {EXPORT_TOLERANCE}); please report this")
    dense = count(create_tnn(cfg.model.name, info.channels, info.num_classes, info.image_size), example[:1])
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


def tracking_metrics(stats: EpochStats, size: dict | None, dense: dict) -> dict:
    """What MLflow gets per epoch: `epoch_metrics` plus kept fractions per layer and the size
    (None: not measured this epoch)."""
    metrics = epoch_metrics(stats)
    for layer, row in stats.kept.get("layers", {}).items():
        metrics[f"kept/{layer}"] = row["kept"] / max(row["units"], 1)
    if size is not None:
        metrics.update({"compact/params": size["params"], "compact/macs": size["macs"],
                        "params_kept": size["params"] / dense["params"], "macs_kept": size["macs"] / dense["macs"]})
    return metrics


def factor_histograms(engine: Engine, epoch: int, bins: int = 20) -> dict:
    factors = engine.compute_factors(epoch)
    if factors is None:
        return {}
    out = {}
    for spec, f in zip(engine.gates.specs, factors):
        counts, edges = np.histogram(f.detach().float().cpu().numpy().ravel(), bins=bins)
        out[spec.layer] = {"counts": counts.tolist(), "edges": edges.tolist()}
    return out


def checkpoint_bundle(cfg: Config, info: DatasetInfo, engine: Engine, epoch: int, steps_per_epoch: int,
                      history: list[EpochStats], best: dict | None = None, rng: list[dict] | None = None) -> dict:
    """Everything a run needs to continue after `epoch` exactly as if it had not stopped: both
    networks, both optimisers and schedules, the history, the selection so far and every worker's
    generators. The phase position follows from (epoch, steps_per_epoch): checkpoints are taken at
    epoch ends, and the data order is a function of (seed, epoch)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "data_info": asdict(info),
        "epoch": epoch,
        "steps_per_epoch": steps_per_epoch,
        "engine": engine.state_dict(),
        "history": [h.to_dict() for h in history],
        "best": dict(best) if best is not None else {"val_acc": -1.0, "epoch": None},
        "rng": rng,
    }


def export_checkpoint(path: str | Path, out: str | Path) -> dict:
    """`distswitch export`: the compact model of a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist; pass e.g. outputs/run/checkpoints/best.pt")
    try:
        bundle = read_checkpoint(path)
    except Exception as exc:  # a truncated or foreign file: say which, not a pickle traceback
        raise ConfigError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}); pass a distswitch checkpoint") from None
    if not isinstance(bundle, dict) or bundle.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{str(path)!r} is not a distswitch training checkpoint (expected format {CHECKPOINT_FORMAT})")
    cfg = Config.from_dict(bundle["config"])
    # One pass on CPU: compiling would cost more than it saves, and NHWC buys nothing there.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile="none", channels_last=False))
    info = DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in bundle["data_info"].items()})
    device = torch.device("cpu")
    tnn, gates, method = build(cfg, info, bundle["steps_per_epoch"], device)
    engine = Engine(cfg, tnn, gates, method, device)
    engine.load_state_dict(bundle["engine"])
    if engine.compute_factors(bundle["epoch"]) is None:
        why = "a dense warm-up epoch" if method.source is not None else f"method {cfg.method!r} has none"
        raise ConfigError(f"checkpoint {str(path)!r} has no switcher factors ({why}): nothing to compact; "
                          "pass a checkpoint of a switched epoch, e.g. <out_dir>/checkpoints/best.pt")
    torch.manual_seed(0)
    example = torch.randn(8, info.channels, info.image_size, info.image_size)
    return export_compact(cfg, info, engine, bundle["epoch"], example, Path(out))


def _epoch_line(cfg: Config, s: EpochStats) -> str:
    losses = " ".join(f"{ph}/loss={v:.4f}" for ph, v in s.train_loss.items())
    return (f"epoch {s.epoch + 1}/{cfg.train.epochs} {losses} val/acc={s.val_acc:.4f} "
            f"kept={s.kept_fraction:.3f} ({s.seconds:.1f}s, {s.images_per_s:.0f} img/s)")


