"""Typed, frozen run configuration: YAML file + dotted overrides -> validated `Config`.

The config is validated once, before anything runs, and crosses process boundaries as a plain dict
(`Config.to_dict` / `Config.from_dict`). Names that depend on registries (models, datasets, methods,
switchers) are checked against those registries by `validate_names` in cli/launch code, so this module
stays at the top of the data flow and imports nothing from the package.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; users mean a number (as in YAML 1.2 and Python)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def channels_last_on(train: "TrainConfig") -> bool:
    """train.channels_last, where null means on: NHWC convolutions use tensor cores on CUDA, and on a CPU
    (oneDNN) a LeNet5 step ran 1.5-1.6x faster than NCHW (docs/results.md)."""
    return train.channels_last is not False


class ConfigError(ValueError):
    """A user-facing configuration problem: the message names the key and what is allowed."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "lenet5"
    gated: Literal["all", "fc", "classifier"] = "all"


@dataclass(frozen=True)
class SwitcherConfig:
    arch: str = "rowwise"
    width: int = 32
    granularity: Literal["neuron", "connection"] = "neuron"
    # Optional L1 penalty on the factors (mean over units) in SNN steps; 0 = the papers' setting.
    # With a budget, each unit's factor is weighted by its share of the budgeted cost instead.
    l1: float = 0.0
    # With l1 > 0: the penalty acts only while the kept fraction of units is above this target
    # (null = always), so a run settles near a chosen size instead of shrinking without end.
    target_kept: Union[float, None] = None
    # Factor value the switcher starts at (output bias), so a fresh switcher leaves the TNN intact.
    init_factor: float = 1.0
    # Fewest units a gated layer may keep: below it, training stops with an error at the end of
    # the epoch (the last checkpoint stays the one before). 0 lets a layer go dark entirely.
    min_kept: int = 1
    # What a unit is judged by: "both" (incoming and outgoing weights, BatchNorm gain; invariant to
    # rescaling a ReLU unit's two sides) or "incoming" (its incoming weights only, the papers' view).
    describe: Literal["both", "incoming"] = "both"
    # Rowwise switcher: the final ReLU passes gradients below 0, so a switched-off unit can come back.
    revive: bool = True


@dataclass(frozen=True)
class ScheduleConfig:
    # k: k TNN steps, then 1 SNN step; "epoch": whole epochs alternate (TNN first), as in the papers.
    update_ratio: Union[int, Literal["epoch"]] = 4
    # Dense TNN epochs before the switcher is switched on.
    warmup_epochs: int = 0
    # Last epochs: TNN steps only, the switcher frozen (its factors still act) -- the counterpart
    # of the baselines' fine-tuning.
    finetune_epochs: int = 0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    # Global batch: each of distributed.num_workers workers takes batch_size / num_workers.
    batch_size: int = 128
    eval_batch_size: int = 1024  # per worker
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True
    # fp32, or autocast to bf16 / fp16 (fp16 with a gradient scaler per phase). Weights, optimiser
    # state and the switcher's factors stay fp32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Convolution activations and weights in NHWC; null = on (CUDA and CPU alike).
    channels_last: Union[bool, None] = None
    # torch.compile: none | switcher (the factor source, run every step) | all (the TNN too).
    # Compiling costs tens of seconds per worker at start (cached on disk for later runs).
    compile: Literal["none", "switcher", "all"] = "none"


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # a registered optimiser (distswitch.optim): sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    # constant | cosine (to 0 over the run) | multistep (x gamma at `milestones`, in epochs)
    scheduler: str = "cosine"  # a registered schedule (distswitch.optim): constant | cosine | multistep
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1


@dataclass(frozen=True)
class OptimConfig:
    tnn: OptimizerConfig = field(default_factory=OptimizerConfig)
    snn: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(name="adam", lr=1e-3, momentum=0.0, weight_decay=0.0)
    )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion-mnist"
    # None = the dataset's default location (Fashion-MNIST: Debian's /usr/share/datasets/fashion-mnist).
    root: Union[str, None] = None
    download: bool = False
    # ffcv: .beton files written by `distswitch data prepare`; torch: in-memory arrays + DataLoader.
    loader: Literal["ffcv", "torch"] = "ffcv"
    # Folder of the .beton files and metadata.json; null = data/ffcv/<dataset> (relative paths are
    # taken from the launching directory; on a cluster put the files on shared storage).
    beton_dir: Union[str, None] = None
    # Model input shape; null = the dataset's own. 3 for a grayscale set replicates the channel;
    # a larger image_size pads with black (Fashion-MNIST as 3x32x32). imagefolder: the crop size.
    channels: Union[int, None] = None
    image_size: Union[int, None] = None
    # Use only the first N examples of the training split (after the validation split is carved out).
    train_limit: Union[int, None] = None
    # Validation examples carved from the training set with a fixed permutation (split_seed).
    val_size: int = 5000
    split_seed: int = 0
    augment: bool = True
    # torch: DataLoader processes (0 = in the training process); ffcv: decoding threads
    # (0 = this worker's share of the node's cores).
    num_workers: int = 0


@dataclass(frozen=True)
class BudgetConfig:
    """The size every method must meet: `fraction` of the dense model's `kind` (null = no budget).

    The exported compact model meets it within 1% (measured on the compact model itself); the same
    budget drives switch, magnitude and slimming, so runs with one budget are compared at one cost.
    """

    kind: Literal["macs", "params", "units"] = "macs"
    fraction: Union[float, None] = None
    # Diagnostic: the final cut keeps exactly these units per gated layer ({layer: count}; null = the
    # method's own allocation), ranked by the method's scores -- e.g. magnitude pruning with the
    # switcher's per-layer widths separates which units are kept from how many per layer.
    widths: Union[dict, None] = None


@dataclass(frozen=True)
class PruneConfig:
    """Baselines (magnitude, slimming): prune once to the budget (or, without one, to `kept_fraction`
    of each layer's units), then fine-tune the last `finetune_epochs`."""

    # Without a budget: the fraction of units each layer keeps (null = 0.5). With a budget: null.
    kept_fraction: Union[float, None] = None
    # once: one cut at the prune epoch; gradual: with a budget, a cut to a cubic ramp from 1 down to
    # the budget at each epoch from schedule.warmup_epochs on (as the switcher's), masks re-derived
    # from the current weights each time, the last one at the budget.
    schedule: Literal["once", "gradual"] = "once"
    finetune_epochs: int = 2
    # Slimming's L1 coefficient on the per-neuron scales (Liu et al. 2017 use 1e-4 to 1e-5).
    l1: float = 1e-4


@dataclass(frozen=True)
class DistributedConfig:
    """Ray Train launch: every run goes through a TorchTrainer, one worker included."""

    num_workers: int = 1
    use_gpu: bool = False
    # Per worker, e.g. {CPU: 4, GPU: 1}; empty = Ray's default (1 CPU, plus 1 GPU with use_gpu).
    resources_per_worker: dict = field(default_factory=dict)
    # auto = nccl with GPUs, gloo on CPU.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Where Ray Train keeps checkpoints: null = <out_dir>/ray; a shared path or s3://... on multi-node.
    storage_path: Union[str, None] = None
    # Ray Train run name (the folder under storage_path); null = the name of out_dir. A second
    # launch with the same name and storage continues from its latest checkpoint.
    name: Union[str, None] = None
    sync_batchnorm: bool = False
    # Worker-group restarts Ray Train may make after a failure (-1 = unlimited). Not 0 (Ray's
    # default): a run left for days should survive a lost worker; each restart resumes the latest
    # checkpoint, and a stop (divergence, a dark layer) is never retried.
    max_failures: int = 3
    checkpoint_every: int = 1  # epochs
    checkpoints_to_keep: int = 2
    # Local cluster only (no RAY_ADDRESS): CPUs Ray may use; null = all of this machine's.
    local_cpus: Union[int, None] = None


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: null uri = MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db (artifacts in out_dir)."""

    enabled: bool = True
    uri: Union[str, None] = None
    experiment: str = "distswitch"
    run_name: Union[str, None] = None  # null = out_dir's name


@dataclass(frozen=True)
class TuneConfig:
    """`distswitch tune`: Ray Tune over the switcher's settings, ASHA early stopping."""

    # Dotted config key -> one of {choice: [...]}, {grid: [...]} (every value, each num_samples
    # times, in order), {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]} (hi exclusive).
    space: dict = field(default_factory=lambda: {"switcher.width": {"choice": [16, 32, 64]},
                                                 "schedule.update_ratio": {"choice": [1, 2, 4, 8]}})
    num_samples: int = 8
    # val/acc, or tune/score = val/acc - kept_weight * kept_fraction (accuracy traded against size).
    metric: Literal["val/acc", "tune/score"] = "val/acc"
    kept_weight: float = 0.1
    grace_period: int = 1  # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: int = 2
    # null = the cluster's CPUs (or GPUs) / what one trial's workers take.
    max_concurrent_trials: Union[int, None] = None
    name: Union[str, None] = None  # null = out_dir's name; the same name resumes the search


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: str = "switch"
    switcher: SwitcherConfig = field(default_factory=SwitcherConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    out_dir: str = "outputs/run"

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        cfg = _build(cls, data, prefix="")
        _check_values(cfg)
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list of " + _describe(typing.get_args(tp)[0])
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}.get(tp, str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key` and the allowed values."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: got {value!r}; expected {_describe(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        return tuple(_coerce(typing.get_args(tp)[0], v, key) for v in value)
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    raise bad


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)  # YAML keys may be numbers too
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp, value, key = hints[name], data[name], prefix + name
        kwargs[name] = _build(tp, value, key + ".") if dataclasses.is_dataclass(tp) else _coerce(tp, value, key)
    return cls(**kwargs)


def _check_values(cfg: Config) -> None:
    def require(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: got {value!r}; must be {allowed}")

    require(cfg.switcher.width > 0, "switcher.width", cfg.switcher.width, "a positive integer")
    require(cfg.switcher.l1 >= 0 and math.isfinite(cfg.switcher.l1), "switcher.l1", cfg.switcher.l1, ">= 0")
    init = cfg.switcher.init_factor
    require(math.isfinite(init) and init > 0, "switcher.init_factor", init, "a finite number > 0")
    require(cfg.switcher.min_kept >= 0, "switcher.min_kept", cfg.switcher.min_kept, "an integer >= 0")
    target = cfg.switcher.target_kept
    require(target is None or 0 < target < 1, "switcher.target_kept", target, "null or in (0, 1)")
    require(target is None or cfg.switcher.l1 > 0, "switcher.target_kept", target, "null unless switcher.l1 > 0")
    ratio = cfg.schedule.update_ratio
    require(ratio == "epoch" or ratio >= 1, "schedule.update_ratio", ratio, "an integer >= 1 or 'epoch'")
    require(cfg.schedule.warmup_epochs >= 0, "schedule.warmup_epochs", cfg.schedule.warmup_epochs, ">= 0")
    require(cfg.data.channels in (None, 1, 3), "data.channels", cfg.data.channels, "null, 1 or 3")
    size = cfg.data.image_size
    require(size is None or 8 <= size <= 4096, "data.image_size", size, "null or an integer in [8, 4096]")
    require(cfg.train.epochs >= 1, "train.epochs", cfg.train.epochs, ">= 1")
    require(cfg.train.batch_size >= 1, "train.batch_size", cfg.train.batch_size, ">= 1")
    require(cfg.train.eval_batch_size >= 1, "train.eval_batch_size", cfg.train.eval_batch_size, ">= 1")
    for phase in ("tnn", "snn"):
        opt: OptimizerConfig = getattr(cfg.optim, phase)
        key = f"optim.{phase}"
        require(math.isfinite(opt.lr) and opt.lr > 0, f"{key}.lr", opt.lr, "a finite number > 0")
        require(0 <= opt.momentum < 1, f"{key}.momentum", opt.momentum, "in [0, 1)")
        require(opt.weight_decay >= 0, f"{key}.weight_decay", opt.weight_decay, ">= 0")
        require(0 < opt.gamma <= 1, f"{key}.gamma", opt.gamma, "in (0, 1]")
        require(not opt.nesterov or opt.momentum > 0, f"{key}.nesterov", opt.nesterov, "false when momentum is 0")
    require(cfg.schedule.finetune_epochs >= 0, "schedule.finetune_epochs", cfg.schedule.finetune_epochs, ">= 0")
    if cfg.method == "switch":
        busy = cfg.schedule.warmup_epochs + cfg.schedule.finetune_epochs
        if busy >= cfg.train.epochs:
            w, f = cfg.schedule.warmup_epochs, cfg.schedule.finetune_epochs
            key = "schedule.finetune_epochs" if f else "schedule.warmup_epochs"
            raise ConfigError(
                f"{key}: warmup_epochs {w} + finetune_epochs {f} leave no switcher epoch of "
                f"train.epochs={cfg.train.epochs}; lower them or raise train.epochs"
            )
    limit = cfg.data.train_limit
    require(limit is None or limit >= 1, "data.train_limit", limit, "null or >= 1")
    require(cfg.data.val_size >= 1, "data.val_size", cfg.data.val_size, ">= 1")
    require(cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, ">= 0")
    kept = cfg.prune.kept_fraction
    require(kept is None or 0 < kept <= 1, "prune.kept_fraction", kept, "null or in (0, 1]")
    _check_budget(cfg, require)
    require(cfg.prune.l1 >= 0, "prune.l1", cfg.prune.l1, ">= 0")
    _check_distributed(cfg, require)
    _check_tune(cfg, require)
    if cfg.method in ("magnitude", "slimming"):
        require(
            0 < cfg.prune.finetune_epochs < cfg.train.epochs,
            "prune.finetune_epochs",
            cfg.prune.finetune_epochs,
            f"in [1, train.epochs) = [1, {cfg.train.epochs})",
        )


def _check_budget(cfg: Config, require) -> None:
    b = cfg.budget
    require(b.fraction is None or 0 < b.fraction <= 1, "budget.fraction", b.fraction, "null or in (0, 1]")
    if b.fraction is None:
        return
    require(cfg.prune.kept_fraction is None, "prune.kept_fraction", cfg.prune.kept_fraction,
            "null with a budget (budget.fraction sets the size of every method)")
    require(cfg.switcher.target_kept is None, "switcher.target_kept", cfg.switcher.target_kept,
            "null with a budget (budget.fraction sets the size; the switcher moves toward it by itself)")
    for layer, n in (b.widths or {}).items():
        require(isinstance(n, int) and not isinstance(n, bool) and n >= 1, f"budget.widths.{layer}", n, "an integer >= 1")
    require(cfg.switcher.granularity == "neuron" or cfg.method != "switch", "switcher.granularity",
            cfg.switcher.granularity, "'neuron' with a budget (connection gates keep the dense shapes)")
    if cfg.method == "switch":
        require(cfg.schedule.finetune_epochs >= 1, "schedule.finetune_epochs", cfg.schedule.finetune_epochs,
                ">= 1 with a budget (the cut to the exact budget happens when fine-tuning starts)")


def _check_distributed(cfg: Config, require) -> None:
    d = cfg.distributed
    require(d.num_workers >= 1, "distributed.num_workers", d.num_workers, ">= 1")
    require(d.max_failures >= -1, "distributed.max_failures", d.max_failures, ">= -1 (-1 = unlimited)")
    require(d.checkpoint_every >= 1, "distributed.checkpoint_every", d.checkpoint_every, ">= 1 (epochs)")
    require(d.checkpoints_to_keep >= 1, "distributed.checkpoints_to_keep", d.checkpoints_to_keep, ">= 1")
    require(d.local_cpus is None or d.local_cpus >= 1, "distributed.local_cpus", d.local_cpus, "null or >= 1")
    for name, amount in d.resources_per_worker.items():
        ok = isinstance(name, str) and isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount >= 0
        require(ok, f"distributed.resources_per_worker.{name}", amount, "a number >= 0")
    require(d.backend != "nccl" or d.use_gpu, "distributed.backend", d.backend, "'auto' or 'gloo' without GPUs (nccl needs distributed.use_gpu: true)")
    require(not d.sync_batchnorm or d.use_gpu, "distributed.sync_batchnorm", d.sync_batchnorm,
            "false without GPUs (torch's SyncBatchNorm has no CPU kernel)")
    # SyncBatchNorm's collectives in every layer's forward break a compiled TNN's graph (issue 20).
    require(not d.sync_batchnorm or cfg.train.compile != "all", "distributed.sync_batchnorm", d.sync_batchnorm,
            "false with train.compile: all (or set train.compile: switcher)")
    require(d.use_gpu or cfg.train.device != "cuda", "train.device", cfg.train.device,
            "'auto' or 'cpu' unless distributed.use_gpu is true (workers get no GPU otherwise)")
    # A global batch split evenly across workers: the same optimisation for any number of workers.
    require(cfg.train.batch_size % d.num_workers == 0, "train.batch_size", cfg.train.batch_size,
            f"a multiple of distributed.num_workers ({d.num_workers}): each worker takes an equal share of the global batch")


DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


def _check_tune(cfg: Config, require) -> None:
    t = cfg.tune
    require(t.num_samples >= 1, "tune.num_samples", t.num_samples, ">= 1")
    require(t.kept_weight >= 0, "tune.kept_weight", t.kept_weight, ">= 0")
    require(t.grace_period >= 1, "tune.grace_period", t.grace_period, ">= 1 (epochs)")
    require(t.reduction_factor >= 2, "tune.reduction_factor", t.reduction_factor, ">= 2")
    require(t.max_concurrent_trials is None or t.max_concurrent_trials >= 1, "tune.max_concurrent_trials",
            t.max_concurrent_trials, "null or >= 1")
    for key, spec in t.space.items():
        where = f"tune.space.{key}"
        ok = isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS
        require(ok, where, spec, "one of {choice: [...]}, {grid: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, "
                "{randint: [lo, hi]}")
        kind, values = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            require(isinstance(values, list) and len(values) >= 1, where, spec, f"a non-empty list of {kind} values")
        else:
            require(isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values)
                    and values[0] < values[1], where, spec, f"{{{kind}: [lo, hi]}} with lo < hi")
        probes = values if kind in ("choice", "grid") else values[:1] if kind == "randint" else [float(v) for v in values]
        for value in probes:  # every value must make a valid config (key exists, type and range fit)
            parts = key.split(".")
            nested: dict = value
            for part in reversed(parts):
                nested = {part: nested}
            base = cfg.to_dict()
            base["tune"] = {"space": {}}  # a trial's config: no search space of its own
            try:
                Config.from_dict(_merge(base, nested))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {value!r} does not fit the config ({exc})") from None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.epochs=3' -> (['train', 'epochs'], 3); the value is parsed as YAML (3, 0.1, true, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, float) and math.isnan(value):
        value = float("nan")
    return key.split("."), value


def merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = _deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return merged


def _deepcopy(data: Any) -> Any:
    return {k: _deepcopy(v) for k, v in data.items()} if isinstance(data, dict) else data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (None = all defaults), apply dotted overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file such as configs/fashion_lenet5.yaml")
        try:
            data = _yaml_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections (model:, train:, ...), "
                              f"got {_describe(type(data))}")
    return Config.from_dict(merge_overrides(data, list(overrides)))
