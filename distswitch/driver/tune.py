"""`distswitch tune`: Ray Tune over the switcher's settings (width, update ratio, learning rates).

Train V2 pattern: every trial is a Tune function that builds the same TorchTrainer as `train`
(`driver.train.make_trainer`) and waits for it; `TuneReportCallback` forwards rank 0's epoch reports to
Tune, where ASHA stops weak trials early. The search's name has no timestamp: running the same
command again restores the search (`Tuner.restore`) and every trial's Train run resumes from its
checkpoints. MLflow: one parent run for the search, one nested child run per trial
(`mlflow.parentRunId`), and at the end the trial table and the best config (also written as YAML,
ready for `distswitch train`). A trial that Tune stops early has its run closed by a Tune callback
(KILLED), never left RUNNING.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import yaml

from distswitch.build import validate_names
from distswitch.config import Config, ConfigError, set_dotted
from distswitch.driver import sweep as sweeping
from distswitch.driver.claim import claim
from distswitch.driver.launch import on_cluster, prepare
from distswitch.driver.run import RunHandle
from distswitch.driver.train import Worker, fit, make_trainer, storage_path
from distswitch.io import write_json, write_text

# The trial function only drives its TorchTrainer, whose workers hold the real resources. Tune
# refuses an empty request: a little memory, not a sliver of a CPU (which kept a second 1-worker
# trial off a 2-CPU machine, and the last CPU of any cluster idle).
TRIAL_DRIVER_RESOURCES = {"memory": 64 * 2**20}
TRIAL_TAG = "distswitch.tune_trial_id"


def search_space(cfg: Config) -> dict:
    from ray import tune

    make = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {key: make[kind](values) for key, spec in cfg.tune.space.items() for kind, values in spec.items()}


def trial_config(base: dict, values: dict, out_dir: Path, name: str, uri: str | None) -> Config:
    """The search's config with one trial's values (dotted keys; a sweep's variant first), its own
    out_dir and run name."""
    data = json.loads(json.dumps(base))
    values = dict(values)
    if sweeping.VARIANT_KEY in values:
        sweeping.apply_variant(data, values.pop(sweeping.VARIANT_KEY))
    for key, value in values.items():
        set_dotted(data, key.split("."), value, f"tune.space.{key}")
    data["out_dir"] = str(out_dir)
    data["tune"] = {"space": {}}  # a trial searches nothing itself
    data["distributed"] = {**data.get("distributed", {}), "name": name}
    if uri:
        data["tracking"] = {**data.get("tracking", {}), "uri": uri, "run_name": name}
    return Config.from_dict(data)


def max_concurrent(ray, cfg: Config, sweep: bool = False) -> int:
    """How many trials' worker groups fit in the cluster at once; a trial that fits nowhere is a
    ConfigError (it would wait for ever)."""
    d = cfg.distributed
    need = dict(d.resources_per_worker) or {"CPU": 1, **({"GPU": 1} if d.use_gpu else {})}
    have = ray.cluster_resources()
    fits = []
    for name, amount in need.items():
        if amount > 0:
            per_trial = amount * d.min_workers
            # Elastic trials are counted at their largest, so that they can grow.
            fits.append(int(have.get(name, 0) // (amount * d.max_workers)))
            if per_trial > have.get(name, 0):
                raise ConfigError(
                    f"distributed: one trial needs {per_trial:g} {name} ({d.min_workers} workers), the "
                    f"cluster has {have.get(name, 0):g}; lower distributed.num_workers or "
                    "distributed.resources_per_worker"
                )
    chosen = cfg.sweep.max_concurrent_trials if sweep else cfg.tune.max_concurrent_trials
    return chosen or max(1, min(fits) if fits else 1)


def tune(cfg: Config, worker: Worker, launched_at: float | None = None, sweep: bool = False) -> dict:
    """Run the search (or, `sweep`, the config's sweep grid), `worker` on every trial's workers;
    returns its summary (also out_dir/tune_summary.json)."""
    launched_at = launched_at if launched_at is not None else time.time()
    validate_names(cfg)
    if sweep:
        sweeping.check(cfg)
    elif not cfg.tune.space:
        raise ConfigError("tune.space: empty; give at least one key, e.g. switcher.width: {choice: [16, 32, 64]}")
    cfg, out = prepare(cfg, "tune_summary.json", "sweep" if sweep else "search")
    with claim(out, "search"):  # one driver per search (its trials are under it), before Ray starts
        return _tune(cfg, worker, out, launched_at, sweep)


def _tune(cfg: Config, worker: Worker, out: Path, launched_at: float, sweep: bool) -> dict:
    write_text(out / "config.yaml", cfg.to_yaml())
    name = (cfg.sweep.name if sweep else cfg.tune.name) or out.resolve().name
    storage = storage_path(cfg)
    kind = "sweep" if sweep else "search"
    search_cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, run_name=f"{name} ({kind})"))
    search = RunHandle.open(search_cfg, storage, name, run_key=f"{storage}/{name}/search")
    try:
        with on_cluster(cfg, storage, search.uri) as ray:
            summary = _search(ray, cfg, worker, out, name, storage, search, launched_at, sweep)
        if sweep:
            summary["comparison"] = sweeping.comparison(out / "trials", out, title=name)
        write_json(out / "tune_summary.json", summary)
        if search.run_id is not None:
            _log_search(search, out, summary)
    except BaseException as exc:  # the search's run never stays RUNNING
        search.fail(exc)
        raise
    search.end()
    return summary


def _search(
    ray,
    cfg: Config,
    worker: Worker,
    out: Path,
    name: str,
    storage: str,
    search: RunHandle,
    launched_at: float,
    sweep: bool,
) -> dict:
    from ray import tune as rtune

    trainable = rtune.with_parameters(
        _trial,
        base=cfg.to_dict(),
        worker=worker,
        trials_dir=str(out.resolve() / "trials"),
        storage=storage,
        search=search,
        launched_at=launched_at,
    )
    trainable = rtune.with_resources(trainable, TRIAL_DRIVER_RESOURCES)
    path = f"{storage}/{name}"
    grid = _tuner(ray, cfg, trainable, name, storage, path, search, sweep).fit()
    rows = [_row(result) for result in grid]
    ok = [r for r in grid if not r.error and (r.metrics or {}).get(cfg.tune.metric) is not None]
    if not ok:
        raise RuntimeError(f"no trial of the search reported {cfg.tune.metric}; see {path}")
    best = max(ok, key=lambda r: r.metrics[cfg.tune.metric])
    best_cfg = trial_config(cfg.to_dict(), best.config, Path(cfg.out_dir) / "best", name="best", uri=None)
    best_cfg = dataclasses.replace(best_cfg, distributed=dataclasses.replace(best_cfg.distributed, name=None))
    write_text(out / "best_config.yaml", best_cfg.to_yaml())
    return {
        "name": name,
        "metric": cfg.tune.metric,
        "trials": rows,
        "num_trials": len(rows),
        "best": {
            "config": best.config,
            "metrics": {k: best.metrics.get(k) for k in ("val/acc", "test/acc", "kept_fraction", "tune/score")},
        },
        "best_config_path": str(out / "best_config.yaml"),
        "path": path,
        "mlflow": {"tracking_uri": search.uri, "run_id": search.run_id} if search.run_id is not None else None,
    }


def _row(result) -> dict:
    """One trial of the search's table."""
    metrics = result.metrics or {}
    return {
        "trial": result.path.rsplit("/", 1)[-1] if result.path else None,
        **{f"config.{k}": v for k, v in (result.config or {}).items()},
        "val/acc": metrics.get("val/acc"),
        "test/acc": metrics.get("test/acc"),
        "kept_fraction": metrics.get("kept_fraction"),
        "tune/score": metrics.get("tune/score"),
        "epochs_reported": metrics.get("training_iteration"),
        "error": str(result.error)[:300] if result.error else None,
    }


def _tuner(ray, cfg: Config, trainable, name: str, storage: str, path: str, search: RunHandle, sweep: bool):
    """The search's Tuner: restored from `path` (storage/name) when an earlier driver left it there."""
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler

    space = sweeping.grid(cfg) if sweep else search_space(cfg)
    if rtune.Tuner.can_restore(path):
        print(f"resuming the {'sweep' if sweep else 'search'} in {path}", flush=True)
        return rtune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=space)
    # Iterations are reports: one per epoch, then the final one (test accuracy). ASHA stops a
    # trial that reaches max_t, so max_t lies beyond the last report: a trial that survives
    # the rungs ends by itself and closes its MLflow run with the model logged.
    # A sweep runs every trial to the end: the comparison needs them all.
    scheduler = (
        None
        if sweep
        else ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.train.epochs + 2,
            grace_period=cfg.tune.grace_period,
            reduction_factor=cfg.tune.reduction_factor,
        )
    )
    callbacks = [close_runs_callback(search.uri)] if search.run_id is not None else []
    return rtune.Tuner(
        trainable,
        param_space=space,
        tune_config=rtune.TuneConfig(
            metric=cfg.tune.metric,
            mode="max",
            scheduler=scheduler,
            num_samples=1 if sweep else cfg.tune.num_samples,
            max_concurrent_trials=max_concurrent(ray, cfg, sweep),
        ),
        run_config=rtune.RunConfig(name=name, storage_path=storage, callbacks=callbacks),
    )


def _trial(
    values: dict, base: dict, worker: Worker, trials_dir: str, storage: str, search: RunHandle, launched_at: float
) -> None:
    """One trial: the `train` launch with this trial's values, reporting its epochs to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    context = ray.tune.get_context()
    name, trial_id = context.get_trial_name(), context.get_trial_id()
    stopping = _stop_event()
    out = Path(trials_dir) / name
    cfg = trial_config(base, values, out, name, search.uri)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", cfg.to_yaml())
    run = RunHandle.open(cfg, storage, name, parent=search if search.run_id is not None else None)
    if run.run_id is not None:
        from distswitch.delivery import mlflow_client

        mlflow_client(run.uri).set_tag(run.run_id, TRIAL_TAG, trial_id)
    try:
        trainer = make_trainer(cfg, worker, storage, {}, launched_at, run.tracking, callbacks=[TuneReportCallback()])
        summary = run.collect(fit(trainer, cfg, storage))
    except BaseException as exc:
        if run.run_id is not None and stopping is not None and stopping.is_set():
            # Tune stopped the trial (ASHA): its TrainController dies with the trial's actor, and
            # that error is the stop's doing. KILLED, as the driver's callback closes it too.
            _close(run.uri, trial_id)
        else:
            run.fail(exc)
        raise
    run.finish(summary)


def _stop_event():
    """The event Tune sets when it stops this trial (`Trainable.cleanup` -> session.finish), or None.

    Ray has no public way to ask whether a trial is being stopped. The session object is taken
    at the trial's start: Tune drops its global reference to it while stopping."""
    try:
        # Private: no public API tells a function trainable that Tune is stopping it (a stop is not
        # an exception in the trial; cf. ray-project/ray#50358 on Tune's stop handling).
        from ray.train._internal.session import get_session

        return get_session().stop_event
    except Exception:  # another Ray version: fall back to FAILED, as for any error
        return None


def close_runs_callback(uri: str):
    """A Tune callback (driver side): a trial that ended without closing its MLflow run (stopped
    early by ASHA, or killed) gets it closed as KILLED. Built on demand: importing Ray before the
    launcher sets its environment would switch Ray's `uv run` hook back on."""
    from ray.tune import Callback

    class CloseRuns(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            _close(uri, trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            _close(uri, trial.trial_id)

    return CloseRuns()


def _close(uri: str, trial_id: str) -> None:
    from distswitch.delivery import mlflow_client

    client = mlflow_client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'"):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "distswitch.stopped_by", "tune (early stopping or trial end)")
            client.set_terminated(run.info.run_id, "KILLED")


def _log_search(search: RunHandle, out: Path, summary: dict) -> None:
    from distswitch.delivery import log_metrics, mlflow_client

    client = mlflow_client(search.uri)
    best = summary["best"]["metrics"]
    metrics = {f"best/{k}": v for k, v in best.items() if isinstance(v, (int, float)) and not math.isnan(v)}
    log_metrics(search.uri, search.run_id, {**metrics, "num_trials": summary["num_trials"]}, step=0)
    client.log_dict(search.run_id, summary["trials"], "trials.json")
    client.log_text(search.run_id, _table(summary["trials"]), "trials.md")
    client.log_artifact(search.run_id, str(out / "best_config.yaml"))
    client.log_text(search.run_id, yaml.safe_dump(summary["best"]["config"]), "best_values.yaml")
    if summary.get("comparison"):  # a sweep's accuracy-vs-MACs table and figure
        client.log_text(search.run_id, summary["comparison"]["table"], "compare/table.md")
        client.log_artifact(search.run_id, summary["comparison"]["figure"], "compare")


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"
