"""The run configuration's schema: one frozen dataclass per section, defaults that run as they
are, each key's meaning beside it. `Config.from_dict` is the one way in (coerced, then checked)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from distswitch.config.checks import check_values, resolve_epoch_shares
from distswitch.config.coerce import build, to_plain


def channels_last_on(train: "TrainConfig") -> bool:
    """train.channels_last, where null means on: NHWC convolutions use tensor cores on CUDA, and on a CPU
    (oneDNN) a LeNet5 step ran 1.5-1.6x faster than NCHW (docs/results.md)."""
    return train.channels_last is not False


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
    # With a budget, how the cut compares factors: global (raw factors across all groups: the
    # switcher allocates) or rank (each factor's rank within its group: the same share of every
    # group, as magnitude pruning allocates; the switcher only chooses which units).
    allocation: Literal["global", "rank"] = "global"
    # What the gated network sees: "factor" (the factors, times the budget's mask: each kept unit
    # re-weighted) or "hard" (0/1, the factors' gradient passed straight through: with a budget its
    # cut's mask, so the ReLU's zeros never cut past the ramp; without one, on where the factor is > 0).
    # Hard: kept units train at the TNN's own learning rate, not scaled by factor^2.
    gate: Literal["factor", "hard"] = "factor"
    # With a budget, how the cut orders units whose factors tie (the ReLU's zeros): by the
    # switcher's score before the ReLU ("score"), or by group and index ("index").
    ties: Literal["score", "index"] = "index"
    # Rowwise switcher: the final ReLU passes gradients below 0, so a switched-off unit can come back.
    revive: bool = True
    # Graph switcher (arch: graph): rounds of messages between units along the weights that join them.
    rounds: int = 2


@dataclass(frozen=True)
class ScheduleConfig:
    # k: k TNN steps, then 1 SNN step; "epoch": whole epochs alternate (TNN first), as in the papers.
    update_ratio: Union[int, Literal["epoch"]] = 4
    # Dense TNN epochs before the switcher is switched on. An integer is epochs; a number in [0, 1)
    # is that share of train.epochs, rounded (so `train.epochs=3` still leaves switcher epochs).
    warmup_epochs: Union[int, float] = 0
    # Last epochs: TNN steps only, the switcher frozen (its factors still act) -- the counterpart
    # of the baselines' fine-tuning. An integer or a share of train.epochs, as warmup_epochs.
    finetune_epochs: Union[int, float] = 0
    # An SNN step "replaces" the TNN step on its batch, or comes as an "extra" step before it: the
    # TNN then gets a step on every batch, as many as a baseline in the same epochs.
    snn_steps: Literal["replace", "extra"] = "replace"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    # Global batch, whatever the number of workers: worker r of w takes examples [B*r//w, B*(r+1)//w)
    # of each global batch, its loss weighted by its share (the same update as one worker x B).
    batch_size: int = 128
    eval_batch_size: int = 1024  # per worker
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True  # a live bar per epoch, on a terminal only (as tqdm does)
    # Ray Train's reporting, checkpoint and controller lines and MLflow's INFO logs (`--verbose`).
    verbose: bool = False
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
    # No degenerate cuts: every cut (every method's) keeps at least this fraction of each unit
    # group's width, rounded up, and at least switcher.min_kept (>= 1) units. A budget that cannot be
    # met so is refused before training, naming the smallest fraction that can.
    min_width: float = 0.1
    # Sparse learning (train the network to be prunable before the cut, as Torch-Pruning's sparse
    # training does): while cutting, TNN steps add this times the group L2 norm (incoming and
    # outgoing weights, bias, BatchNorm gain) of each unit the final cut would remove by the method's
    # current scores, re-ranked every epoch. The same for every method; 0 = off.
    sparse_learning: float = 0.0


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
    # magnitude's unit score: the L2 norm of its incoming weights (incoming), or of every weight and
    # BatchNorm scale/shift removing it removes, outgoing weights included (group: Torch-Pruning's
    # GroupNormImportance, DepGraph's default).
    importance: Literal["incoming", "group"] = "incoming"
    # Epochs after the (last) cut: an integer, or a share of train.epochs as schedule.warmup_epochs.
    finetune_epochs: Union[int, float] = 2
    # Slimming's L1 coefficient on the per-neuron scales (Liu et al. 2017 use 1e-4 to 1e-5).
    l1: float = 1e-4


@dataclass(frozen=True)
class DistributedConfig:
    """Ray Train launch: every run goes through a TorchTrainer, one worker included."""

    # A number, or [min, max]: elastic (Ray Train starts with what is free, at least min, and grows
    # back to max as nodes return; each resize resumes the latest checkpoint on the new group).
    num_workers: Union[int, tuple[int, ...]] = 1
    # Elastic only: seconds between Ray Train's looks for room to grow (each growth is a restart).
    resize_interval: float = 60.0
    # Seconds Ray Train waits for a worker group to start before it gives up on that attempt; null =
    # Ray's (60, or RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S). After a node's loss an elastic run may
    # first try the old size (Ray's view of free resources lags up to 20 s) and waits this out.
    start_timeout: Union[float, None] = None
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

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[-1]


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: null uri = MLFLOW_TRACKING_URI, else MLflow's default store in the launch directory
    (./mlflow.db, artifacts in ./mlruns), one for every run launched there."""

    enabled: bool = True
    uri: Union[str, None] = None
    # null = the config file's name (configs/fashion_lenet5.yaml -> fashion_lenet5), or "distswitch"
    # without a file: runs of one config compare in one experiment.
    experiment: Union[str, None] = None
    run_name: Union[str, None] = None  # null = out_dir's name
    # A registered model's name: each run's compact model becomes a version of it, and the alias
    # `best` its best version (validation accuracy) at the same budget. null = not registered.
    register: Union[str, None] = None
    # MLflow's system metrics (CPU, memory, disk, network; GPU where there is one) from every node, as
    # system/<node IP>/<metric>. On everywhere: sampling every 10 s takes 0.12% of one core (docs/results.md).
    system_metrics: bool = True
    system_metrics_interval: float = 10.0  # seconds between samples
    # What a run logs goes to out_dir/mlflow-outbox first and is shipped in the background (a server
    # that is away blocks no epoch); the end of a run waits this long for it to take the rest (what
    # is left waits for `distswitch sync OUT_DIR`).
    send_timeout: float = 60.0


@dataclass(frozen=True)
class TuneConfig:
    """`distswitch tune`: Ray Tune over the switcher's settings, ASHA early stopping."""

    # Dotted config key -> one of {choice: [...]}, {grid: [...]} (every value, each num_samples
    # times, in order), {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]} (hi exclusive).
    space: dict = field(
        default_factory=lambda: {
            "switcher.width": {"choice": [16, 32, 64]},
            "schedule.update_ratio": {"choice": [1, 2, 4, 8]},
        }
    )
    num_samples: int = 8
    # val/acc, or tune/score = val/acc - kept_weight * kept_fraction (accuracy traded against size).
    metric: Literal["val/acc", "tune/score"] = "val/acc"
    kept_weight: float = 0.1
    grace_period: int = 1  # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: int = 2
    # null = the cluster's CPUs (or GPUs) / what one trial's workers take.
    max_concurrent_trials: Union[int, None] = None
    name: Union[str, None] = None  # null = out_dir's name; the same name resumes the search


# `distswitch sweep`'s named variants: a name -> dotted overrides (a registered method's name needs none).
SWEEP_VARIANTS = {
    "magnitude-gradual": {"method": "magnitude", "prune.schedule": "gradual"},
    "magnitude-gradual-group": {"method": "magnitude", "prune.schedule": "gradual", "prune.importance": "group"},
}


@dataclass(frozen=True)
class SweepConfig:
    """`distswitch sweep`: every method (or named variant) x budget x seed, each a full training run
    (a Ray Tune trial with its own workers), compared at the end as `distswitch compare` does."""

    methods: tuple[str, ...] = ("switch", "magnitude-gradual-group")
    budgets: tuple[Union[float, None], ...] = (0.5,)  # budget.fraction values (null: no budget)
    seeds: tuple[int, ...] = (0, 1, 2)
    # Named variants beyond the built-in ones (SWEEP_VARIANTS): name -> {dotted key: value}.
    variants: dict = field(default_factory=dict)
    # null = the cluster's CPUs (or GPUs) / what one trial's workers take.
    max_concurrent_trials: Union[int, None] = None
    name: Union[str, None] = None  # null = out_dir's name; the same name resumes the sweep
    variant: Union[str, None] = None  # set in each trial's config: which of `methods` it runs


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
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    out_dir: str = "outputs/run"

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        cfg = resolve_epoch_shares(build(cls, data, prefix=""))
        check_values(cfg)
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
