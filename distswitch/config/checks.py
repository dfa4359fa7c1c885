"""Checks across a config's values (ranges, keys that must agree, the search space); each failure
is one ConfigError naming the key and what it must be. Names that depend on registries (models,
datasets, methods, switchers, optimisers) are checked by `build.validate_names`, below the registries."""

from __future__ import annotations

import dataclasses
import math
import posixpath
from typing import Any

from distswitch.config.coerce import ConfigError, set_dotted

# Epoch counts that may be given as a share of train.epochs, and the fewest epochs each may resolve to
# when given as a share (a budget's cut needs a fine-tuning epoch after it; the baselines always do).
_SHARES = {
    ("schedule", "warmup_epochs"): lambda cfg: 0,
    ("schedule", "finetune_epochs"): lambda cfg: int(cfg.budget.fraction is not None and cfg.method == "switch"),
    ("prune", "finetune_epochs"): lambda cfg: int(cfg.method != "switch"),
}


def resolve_epoch_shares(cfg):
    """The config with every epoch share (a number in [0, 1)) turned into whole epochs of train.epochs,
    rounded half up, so one config serves a 3-epoch trial and a 12-epoch run; integers stay as given."""
    for (section, key), fewest in _SHARES.items():
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, int):
            continue
        if not 0 <= value < 1:
            raise ConfigError(
                f"{section}.{key}: got {value!r}; must be an integer number of epochs or a share "
                f"of train.epochs in [0, 1) (e.g. 0.2)"
            )
        if cfg.train.epochs < 1:
            return cfg  # check_values refuses train.epochs
        epochs = max(fewest(cfg), math.floor(value * cfg.train.epochs + 0.5))
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{key: epochs})})
    return cfg


def registered_name_ok(name: str) -> bool:
    """MLflow's rule for a registered model's name (mlflow.utils.validation._validate_model_name),
    checked before a run starts rather than when its model is logged."""
    norm = posixpath.normpath(name)
    return (
        bool(name.strip())
        and "/" not in name
        and ":" not in name
        and norm == name
        and norm != "."
        and not norm.startswith("..")
    )


def check_values(cfg) -> None:
    def require(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: got {value!r}; must be {allowed}")

    _check_switcher(cfg, require)
    _check_tracking(cfg, require)
    ratio = cfg.schedule.update_ratio
    require(ratio == "epoch" or ratio >= 1, "schedule.update_ratio", ratio, "an integer >= 1 or 'epoch'")
    require(cfg.schedule.warmup_epochs >= 0, "schedule.warmup_epochs", cfg.schedule.warmup_epochs, ">= 0")
    require(cfg.data.channels in (None, 1, 3), "data.channels", cfg.data.channels, "null, 1 or 3")
    size = cfg.data.image_size
    require(size is None or 8 <= size <= 4096, "data.image_size", size, "null or an integer in [8, 4096]")
    require(cfg.train.epochs >= 1, "train.epochs", cfg.train.epochs, ">= 1")
    require(cfg.train.batch_size >= 1, "train.batch_size", cfg.train.batch_size, ">= 1")
    require(cfg.train.eval_batch_size >= 1, "train.eval_batch_size", cfg.train.eval_batch_size, ">= 1")
    _check_optim(cfg, require)
    require(cfg.schedule.finetune_epochs >= 0, "schedule.finetune_epochs", cfg.schedule.finetune_epochs, ">= 0")
    if cfg.method == "switch":
        busy = cfg.schedule.warmup_epochs + cfg.schedule.finetune_epochs
        if busy >= cfg.train.epochs:
            w, f = cfg.schedule.warmup_epochs, cfg.schedule.finetune_epochs
            key = "schedule.finetune_epochs" if f else "schedule.warmup_epochs"
            raise ConfigError(
                f"{key}: warmup_epochs {w} + finetune_epochs {f} leave no switcher epoch of "
                f"train.epochs={cfg.train.epochs}; lower them, give them as shares of train.epochs "
                f"(e.g. warmup_epochs=0.1 finetune_epochs=0.2), or raise train.epochs"
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
            f"in [1, train.epochs) = [1, {cfg.train.epochs}), or a share of train.epochs such as 0.2",
        )


def _check_tracking(cfg, require) -> None:
    name = cfg.tracking.register
    require(
        name is None or registered_name_ok(name),
        "tracking.register",
        name,
        "null or a name MLflow's registry accepts (not empty, no '/' or ':', not a path such as '..')",
    )
    interval = cfg.tracking.system_metrics_interval
    require(
        math.isfinite(interval) and interval > 0,
        "tracking.system_metrics_interval",
        interval,
        "a number of seconds > 0",
    )
    wait = cfg.tracking.send_timeout
    require(math.isfinite(wait) and wait >= 0, "tracking.send_timeout", wait, "a number of seconds >= 0")


def _check_optim(cfg, require) -> None:
    for phase in ("tnn", "snn"):
        opt = getattr(cfg.optim, phase)
        key = f"optim.{phase}"
        require(math.isfinite(opt.lr) and opt.lr > 0, f"{key}.lr", opt.lr, "a finite number > 0")
        require(0 <= opt.momentum < 1, f"{key}.momentum", opt.momentum, "in [0, 1)")
        require(opt.weight_decay >= 0, f"{key}.weight_decay", opt.weight_decay, ">= 0")
        require(0 < opt.gamma <= 1, f"{key}.gamma", opt.gamma, "in (0, 1]")
        require(not opt.nesterov or opt.momentum > 0, f"{key}.nesterov", opt.nesterov, "false when momentum is 0")


def _check_switcher(cfg, require) -> None:
    sw = cfg.switcher
    require(sw.width > 0, "switcher.width", sw.width, "a positive integer")
    require(sw.rounds >= 0, "switcher.rounds", sw.rounds, "an integer >= 0")
    require(sw.l1 >= 0 and math.isfinite(sw.l1), "switcher.l1", sw.l1, ">= 0")
    require(
        math.isfinite(sw.init_factor) and sw.init_factor > 0,
        "switcher.init_factor",
        sw.init_factor,
        "a finite number > 0",
    )
    require(sw.min_kept >= 0, "switcher.min_kept", sw.min_kept, "an integer >= 0")
    require(
        sw.target_kept is None or 0 < sw.target_kept < 1, "switcher.target_kept", sw.target_kept, "null or in (0, 1)"
    )
    require(sw.target_kept is None or sw.l1 > 0, "switcher.target_kept", sw.target_kept, "null unless switcher.l1 > 0")


def _check_budget(cfg, require) -> None:
    b = cfg.budget
    require(b.fraction is None or 0 < b.fraction <= 1, "budget.fraction", b.fraction, "null or in (0, 1]")
    require(0 <= b.min_width < 1, "budget.min_width", b.min_width, "a fraction in [0, 1) of each unit group's width")
    require(
        math.isfinite(b.sparse_learning) and b.sparse_learning >= 0,
        "budget.sparse_learning",
        b.sparse_learning,
        "a finite number >= 0",
    )
    require(
        b.sparse_learning == 0 or b.fraction is not None,
        "budget.sparse_learning",
        b.sparse_learning,
        "0 without a budget (it shrinks the units the budget's cut removes; set budget.fraction)",
    )
    if b.fraction is None:
        return
    require(
        cfg.prune.kept_fraction is None,
        "prune.kept_fraction",
        cfg.prune.kept_fraction,
        "null with a budget (budget.fraction sets the size of every method)",
    )
    require(
        cfg.switcher.target_kept is None,
        "switcher.target_kept",
        cfg.switcher.target_kept,
        "null with a budget (budget.fraction sets the size; the switcher moves toward it by itself)",
    )
    for layer, n in (b.widths or {}).items():
        require(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1, f"budget.widths.{layer}", n, "an integer >= 1"
        )
    require(
        cfg.switcher.granularity == "neuron" or cfg.method != "switch",
        "switcher.granularity",
        cfg.switcher.granularity,
        "'neuron' with a budget (connection gates keep the dense shapes)",
    )
    if cfg.method == "switch":
        require(
            cfg.schedule.finetune_epochs >= 1,
            "schedule.finetune_epochs",
            cfg.schedule.finetune_epochs,
            ">= 1 with a budget (the cut to the exact budget happens when fine-tuning starts)",
        )


def _check_distributed(cfg, require) -> None:
    d = cfg.distributed
    elastic = not isinstance(d.num_workers, int)
    require(
        not elastic or (len(d.num_workers) == 2 and 1 <= d.num_workers[0] <= d.num_workers[1]),
        "distributed.num_workers",
        list(d.num_workers) if elastic else d.num_workers,
        "a number >= 1, or [min, max] with 1 <= min <= max",
    )
    require(d.min_workers >= 1, "distributed.num_workers", d.num_workers, ">= 1")
    require(d.resize_interval > 0, "distributed.resize_interval", d.resize_interval, "> 0 (seconds)")
    require(
        d.start_timeout is None or d.start_timeout > 0,
        "distributed.start_timeout",
        d.start_timeout,
        "null or > 0 (seconds)",
    )
    require(d.max_failures >= -1, "distributed.max_failures", d.max_failures, ">= -1 (-1 = unlimited)")
    require(d.checkpoint_every >= 1, "distributed.checkpoint_every", d.checkpoint_every, ">= 1 (epochs)")
    require(d.checkpoints_to_keep >= 1, "distributed.checkpoints_to_keep", d.checkpoints_to_keep, ">= 1")
    require(d.local_cpus is None or d.local_cpus >= 1, "distributed.local_cpus", d.local_cpus, "null or >= 1")
    for name, amount in d.resources_per_worker.items():
        ok = isinstance(name, str) and isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount >= 0
        require(ok, f"distributed.resources_per_worker.{name}", amount, "a number >= 0")
    require(
        d.backend != "nccl" or d.use_gpu,
        "distributed.backend",
        d.backend,
        "'auto' or 'gloo' without GPUs (nccl needs distributed.use_gpu: true)",
    )
    require(
        not d.sync_batchnorm or d.use_gpu,
        "distributed.sync_batchnorm",
        d.sync_batchnorm,
        "false without GPUs (torch's SyncBatchNorm has no CPU kernel)",
    )
    # SyncBatchNorm's collectives in every layer's forward break a compiled TNN's graph (issue 20).
    require(
        not d.sync_batchnorm or cfg.train.compile != "all",
        "distributed.sync_batchnorm",
        d.sync_batchnorm,
        "false with train.compile: all (or set train.compile: switcher)",
    )
    require(
        d.use_gpu or cfg.train.device != "cuda",
        "train.device",
        cfg.train.device,
        "'auto' or 'cpu' unless distributed.use_gpu is true (workers get no GPU otherwise)",
    )
    # Every worker takes a share of each global batch (shares differ by at most one example).
    require(
        cfg.train.batch_size >= 2 * d.max_workers,
        "train.batch_size",
        cfg.train.batch_size,
        f">= 2 x distributed.num_workers ({d.max_workers}): each worker's share of a batch needs 2 examples "
        "(BatchNorm)",
    )


DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


def _check_tune(cfg, require) -> None:
    t = cfg.tune
    require(t.num_samples >= 1, "tune.num_samples", t.num_samples, ">= 1")
    require(t.kept_weight >= 0, "tune.kept_weight", t.kept_weight, ">= 0")
    require(t.grace_period >= 1, "tune.grace_period", t.grace_period, ">= 1 (epochs)")
    require(t.reduction_factor >= 2, "tune.reduction_factor", t.reduction_factor, ">= 2")
    require(
        t.max_concurrent_trials is None or t.max_concurrent_trials >= 1,
        "tune.max_concurrent_trials",
        t.max_concurrent_trials,
        "null or >= 1",
    )
    for key, spec in t.space.items():
        where = f"tune.space.{key}"
        ok = isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS
        require(
            ok,
            where,
            spec,
            "one of {choice: [...]}, {grid: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}",
        )
        kind, values = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            require(isinstance(values, list) and len(values) >= 1, where, spec, f"a non-empty list of {kind} values")
        else:
            require(
                isinstance(values, list)
                and len(values) == 2
                and all(isinstance(v, (int, float)) for v in values)
                and values[0] < values[1],
                where,
                spec,
                f"{{{kind}: [lo, hi]}} with lo < hi",
            )
        probes = (
            values if kind in ("choice", "grid") else values[:1] if kind == "randint" else [float(v) for v in values]
        )
        for value in probes:  # every value must make a valid config (key exists, type and range fit)
            base = cfg.to_dict()
            base["tune"] = {"space": {}}  # a trial's config: no search space of its own
            try:
                set_dotted(base, key.split("."), value, where)
                type(cfg).from_dict(base)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {value!r} does not fit the config ({exc})") from None
