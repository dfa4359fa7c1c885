"""MLflow tracking: one run per training run, opened by the driver, fed by rank 0, closed by the driver.

The driver opens (or, for a resumed run, re-opens) the run and passes its id to the workers; only
rank 0 logs, by run id through an `MlflowClient` (no active-run global), so a worker-group restart
continues the same run instead of starting another (the trap in Ray issue #48664). The driver logs
the final artifacts and marks the run FINISHED, FAILED (with the error) or KILLED.

What rank 0 and the driver log goes through the run's outbox (out_dir/mlflow-outbox,
`distswitch.delivery`): on disk first, then sent by a background thread that retries, so a server
that is away blocks no epoch and loses nothing; what it has not taken when the run ends waits there
for `distswitch sync OUT_DIR`.

Default store: MLflow's own, `mlflow.db` in the directory the run is launched from, artifacts in
`mlruns/` beside it, so every run launched there lands in one store and a plain `mlflow ui` there
shows them all (see `store_dir`). `tracking.uri` or `MLFLOW_TRACKING_URI` name a server instead;
the URI travels to the workers in the trainer's config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from distswitch.config import Config, ConfigError
from distswitch.delivery import Delivery, mlflow_client, outbox_dir, outbox_entry, run_outbox
from distswitch.outbox import Outbox, send_all
from distswitch.signals import stop_signal

RUN_KEY_TAG = "distswitch.run_key"  # storage path + run name: what identifies a resumable run
# The selected model's results, logged once at the end under `best/`: MLflow's chart view and a run
# page's metrics sort by name, so what a run delivered comes first (and stays out of the per-epoch
# series).
BEST = {
    "test_acc": "best/test_acc",
    "val_acc": "best/val_acc",
    "kept": "best/kept_fraction",
    "params": "best/compact_params",
    "macs": "best/compact_macs",
}
# MLflow's experiment page opens on its training runs for this kind (not on the GenAI overview).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


# Set by `ray job submit` in the job's driver, whose working directory is Ray's temporary copy of
# --working-dir (gone with the job).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def store_dir(cfg: Config) -> Path:
    """Where the default store lives: the launch directory (MLflow's default `./mlflow.db`); in a
    submitted Ray job, out_dir's parent (the job's own directory is temporary)."""
    out = Path(cfg.out_dir).resolve()
    return out.parent if os.environ.get(RAY_JOB_ENV) else Path.cwd()


def experiment_name(cfg: Config) -> str:
    """tracking.experiment; a config built without a file (from a dict) names none: "distswitch"."""
    return cfg.tracking.experiment or "distswitch"


def default_uri(folder: Path) -> str:
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_uri(store_dir(cfg))


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict, type(None))) else str(value)
    return out


def open_run(cfg: Config, run_key: str, parent_run_id: str | None = None) -> tuple[str, str]:
    """(uri, run id): the unfinished run with this key (a resume), or a new one with the config
    logged as params and config.yaml; `parent_run_id` nests it (a tune trial under its search).
    A store that cannot be reached is a ConfigError."""
    uri = tracking_uri(cfg)
    _check_reachable(uri)
    client = mlflow_client(uri)
    experiment_id = _experiment_id(client, cfg, uri)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found and found[0].info.status != "FINISHED":
        _reopen(client, cfg, found[0])
        return uri, found[0].info.run_id
    return uri, _new_run(client, cfg, experiment_id, run_key, parent_run_id)


def _experiment_id(client, cfg: Config, uri: str) -> str:
    """The experiment's id, created on first use."""
    try:
        experiment = client.get_experiment_by_name(experiment_name(cfg))
    except Exception as exc:  # connection refused, bad scheme, ...: say which setting to fix
        raise ConfigError(
            f"tracking.uri: cannot reach MLflow at {uri!r} ({type(exc).__name__}: {str(exc)[:200]}); "
            "start the server or set tracking.uri / MLFLOW_TRACKING_URI"
        ) from None
    if experiment is not None:
        return experiment.experiment_id
    local = uri.startswith("sqlite:///")
    # Artifacts beside a local store (MLflow's ./mlruns, made absolute: workers and later
    # launches run elsewhere); a server keeps its own artifact root.
    location = (Path(uri[len("sqlite:///") :]).parent / "mlruns" / experiment_name(cfg)).as_uri() if local else None
    return client.create_experiment(experiment_name(cfg), artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def _reopen(client, cfg: Config, run) -> None:
    """An unfinished run relaunched: RUNNING again, its relaunches counted."""
    run_id = run.info.run_id
    # What the last attempt left unsent (its FAILED or KILLED end among it) goes first: sent later,
    # by this attempt's sender, it would mark the run failed while it runs again.
    try:
        send_all(outbox_dir(cfg.out_dir), Delivery())
    except Exception as exc:  # it stays for this attempt's sender, which says what the server answers
        print(
            f"distswitch: warning: the last attempt's unsent MLflow entries were not taken now ({exc!r:.200})",
            file=sys.stderr,
            flush=True,
        )
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "distswitch.relaunches", str(int(run.data.tags.get("distswitch.relaunches", "0")) + 1))


def _new_run(client, cfg: Config, experiment_id: str, run_key: str, parent_run_id: str | None) -> str:
    """A new run with its source tags, the config as params and config.yaml; its id."""
    from mlflow.entities import Param, RunTag

    # MLflow's own Source column: the command that started the run (its git commit beside it).
    tags = {
        RUN_KEY_TAG: run_key,
        "distswitch.method": cfg.method,
        "distswitch.model": cfg.model.name,
        "distswitch.dataset": cfg.data.dataset,
        "distswitch.command": command_line(),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": command_line(short=True),
    }
    sha = git_sha()
    if sha:
        tags["mlflow.source.git.commit"] = sha
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(
        experiment_id, run_name=cfg.tracking.run_name or Path(cfg.out_dir).resolve().name, tags=tags
    )
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in flatten(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    client.log_batch(run_id, tags=[RunTag("distswitch.out_dir", str(Path(cfg.out_dir).resolve()))])
    return run_id


def command_line(short: bool = False) -> str:
    """The launching command as a person typed it: `distswitch train configs/x.yaml a=1`; `short`
    with paths cut to their last part (MLflow's Source column shows what follows the last '/')."""
    argv = list(sys.argv) or ["distswitch"]
    if Path(argv[0]).name in ("distswitch", "cli.py"):
        argv[0] = "distswitch"
    if short:  # configs/x.yaml -> x.yaml, out_dir=/a/b -> out_dir=b
        argv = [
            key + eq + value.rsplit("/", 1)[-1] if eq else key.rsplit("/", 1)[-1]
            for key, eq, value in (a.partition("=") for a in argv)
        ]
    return " ".join(argv)[:500]


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """An HTTP tracking server answers /health within seconds (MLflow's own client retries with
    backoff for minutes before it gives up)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an auth layer may refuse /health); the client decides
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"tracking.uri: cannot reach MLflow at {uri!r} ({exc}); start the server, "
            "or set tracking.uri / MLFLOW_TRACKING_URI to a reachable one"
        ) from None


def finish_run(uri: str, run_id: str, out_dir: Path, summary: dict, timeout: float) -> bool:
    """Final metrics, the architecture, the compact model and the figures; then FINISHED; all through
    the outbox, waiting up to `timeout` seconds for the server. Whether it took everything (if not, one
    line says how to send the rest); an error no retry cures is raised."""
    values = {
        "test_acc": summary["test_acc"],
        "val_acc": summary["val_acc"],
        "kept": summary["kept_fraction"],
        "params": summary["compact"]["params"],
        "macs": summary["compact"]["macs"],
    }
    final = {
        **{BEST[k]: v for k, v in values.items()},
        "best/epoch": summary["selected_epoch"],
        "test/acc": summary["test_acc"],
        "test/loss": summary["test_loss"],
        "dense/params": summary["dense"]["params"],
        "dense/macs": summary["dense"]["macs"],
    }
    outbox = run_outbox(uri, out_dir, "driver")
    outbox.put(outbox_entry("metrics", uri, run_id, step=len(summary["history"]), metrics=final))
    outbox.put(outbox_entry("finish", uri, run_id, out_dir=str(Path(out_dir).resolve())))
    outbox.put(outbox_entry("end", uri, run_id, status="FINISHED"))
    return _wait(outbox, timeout)


def end_run(uri: str, run_id: str, out_dir: Path, timeout: float) -> bool:
    """The run marked FINISHED through the outbox (a search's, whose results went in directly)."""
    outbox = run_outbox(uri, out_dir, "driver")
    outbox.put(outbox_entry("end", uri, run_id, status="FINISHED"))
    return _wait(outbox, timeout)


def _wait(outbox: Outbox, timeout: float) -> bool:
    try:
        if outbox.flush(timeout):
            return True
        if outbox.error is not None:
            raise outbox.error
    finally:
        outbox.close()
    print(
        f"distswitch: warning: MLflow at {outbox.where} did not take all of this run within {timeout:.0f} s "
        f"({outbox.last_error}); the rest waits in {outbox.journal.folder}: {sync_hint(outbox)}",
        file=sys.stderr,
        flush=True,
    )
    return False


def sync_hint(outbox: Outbox) -> str:
    return f"`distswitch sync {outbox.journal.folder.parent}` sends it"


def fail_run(uri: str, run_id: str, out_dir: Path, error: BaseException, timeout: float) -> None:
    """Mark the run FAILED (KILLED on Ctrl-C or a stop signal, named in a tag) with the error, through
    the outbox; called while `error` propagates, so a store that fails now only warns: the original
    error is the one to see."""
    tags = {"distswitch.error": f"{type(error).__name__}: {error}"[:5000]}
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C, or a stop signal the CLI turned into one
        tags["distswitch.signal"] = stop_signal().name
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    outbox = None
    try:
        outbox = run_outbox(uri, out_dir, "driver")
        outbox.put(outbox_entry("end", uri, run_id, status=status, tags=tags))
        _check_reachable(uri)  # seconds: a Ctrl-C does not wait out a server that is gone
        _wait(outbox, timeout)
    except Exception as exc:
        if outbox is not None:
            outbox.close()
        where = f"; it waits in {outbox.journal.folder}: {sync_hint(outbox)}" if outbox is not None else ""
        print(
            f"distswitch: warning: could not mark MLflow run {run_id} {status} at {uri} ({type(exc).__name__}: "
            f"{str(exc)[:200]}){where}",
            file=sys.stderr,
        )


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
