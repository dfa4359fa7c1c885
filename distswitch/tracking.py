"""MLflow tracking: one run per training run, opened by the driver, fed by rank 0, closed by the driver.

The driver opens (or, for a resumed run, re-opens) the run and passes its id to the workers; only
rank 0 logs, by run id through an `MlflowClient` (no active-run global), so a worker-group restart
continues the same run instead of starting another (the trap in Ray issue #48664). The driver logs
the final artifacts and marks the run FINISHED, FAILED (with the error) or KILLED.

What rank 0 and the driver log goes through the run's outbox (out_dir/mlflow-outbox,
`distswitch.outbox`): on disk first, then sent by a background thread that retries, so a server
that is away blocks no epoch and loses nothing; what it has not taken when the run ends waits there
for `distswitch sync OUT_DIR`.

Default store: MLflow's own, `mlflow.db` in the directory the run is launched from, artifacts in
`mlruns/` beside it, so every run launched there lands in one store and a plain `mlflow ui` there
shows them all (see `store_dir`). `tracking.uri` or `MLFLOW_TRACKING_URI` name a server instead;
the URI travels to the workers in the trainer's config.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from distswitch.config import Config, ConfigError
from distswitch.outbox import Outbox, send_all
from distswitch.run_results import log_results
from distswitch.signals import stop_signal

RUN_KEY_TAG = "distswitch.run_key"  # storage path + run name: what identifies a resumable run
# The selected model's results, logged once at the end under `best/`: MLflow's chart view and a run
# page's metrics sort by name, so what a run delivered comes first (and stays out of the per-epoch
# series).
BEST = {"test_acc": "best/test_acc", "val_acc": "best/val_acc", "kept": "best/kept_fraction",
        "params": "best/compact_params", "macs": "best/compact_macs"}
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


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


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
    from mlflow.entities import Param, RunTag

    uri = tracking_uri(cfg)
    _check_reachable(uri)
    client = mlflow_client(uri)
    try:
        experiment = client.get_experiment_by_name(experiment_name(cfg))
    except Exception as exc:  # connection refused, bad scheme, ...: say which setting to fix
        raise ConfigError(f"tracking.uri: cannot reach MLflow at {uri!r} ({type(exc).__name__}: {str(exc)[:200]}); "
                          "start the server or set tracking.uri / MLFLOW_TRACKING_URI") from None
    if experiment is None:
        local = uri.startswith("sqlite:///")
        # Artifacts beside a local store (MLflow's ./mlruns, made absolute: workers and later
        # launches run elsewhere); a server keeps its own artifact root.
        location = (Path(uri[len("sqlite:///"):]).parent / "mlruns" / experiment_name(cfg)).as_uri() if local else None
        experiment_id = client.create_experiment(experiment_name(cfg), artifact_location=location,
                                                 tags=dict([EXPERIMENT_KIND]))
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status != "FINISHED":
        run_id = found[0].info.run_id
        # What the last attempt left unsent (its FAILED or KILLED end among it) goes first: sent later,
        # by this attempt's sender, it would mark the run failed while it runs again.
        try:
            send_all(outbox_dir(cfg.out_dir), Delivery())
        except Exception as exc:  # it stays for this attempt's sender, which says what the server answers
            print(f"distswitch: warning: the last attempt's unsent MLflow entries were not taken now ({exc!r:.200})",
                  file=sys.stderr, flush=True)
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "distswitch.relaunches", str(int(found[0].data.tags.get("distswitch.relaunches", "0")) + 1))
        return uri, run_id
    # MLflow's own Source column: the command that started the run (its git commit beside it).
    tags = {RUN_KEY_TAG: run_key, "distswitch.method": cfg.method, "distswitch.model": cfg.model.name,
            "distswitch.dataset": cfg.data.dataset, "distswitch.command": command_line(),
            "mlflow.source.type": "LOCAL", "mlflow.source.name": command_line(short=True)}
    sha = git_sha()
    if sha:
        tags["mlflow.source.git.commit"] = sha
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=cfg.tracking.run_name or Path(cfg.out_dir).resolve().name, tags=tags)
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in flatten(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    client.log_batch(run_id, tags=[RunTag("distswitch.out_dir", str(Path(cfg.out_dir).resolve()))])
    return uri, run_id


def command_line(short: bool = False) -> str:
    """The launching command as a person typed it: `distswitch train configs/x.yaml a=1`; `short`
    with paths cut to their last part (MLflow's Source column shows what follows the last '/')."""
    argv = list(sys.argv) or ["distswitch"]
    if Path(argv[0]).name in ("distswitch", "cli.py"):
        argv[0] = "distswitch"
    if short:  # configs/x.yaml -> x.yaml, out_dir=/a/b -> out_dir=b
        argv = [key + eq + value.rsplit("/", 1)[-1] if eq else key.rsplit("/", 1)[-1]
                for key, eq, value in (a.partition("=") for a in argv)]
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
        raise ConfigError(f"tracking.uri: cannot reach MLflow at {uri!r} ({exc}); start the server, "
                          "or set tracking.uri / MLFLOW_TRACKING_URI to a reachable one") from None


OUTBOX = "mlflow-outbox"  # in out_dir: what the run logs, until its tracking server has it


def outbox_dir(out_dir: str | Path) -> Path:
    return Path(out_dir).resolve() / OUTBOX


def transient(exc: BaseException) -> bool:
    """A delivery worth retrying: the server unreachable, timed out or overloaded (MLflow's client
    wraps the connection error it gave up on); not a refusal or a bug of ours."""
    import re

    seen = exc
    while seen is not None:
        if isinstance(seen, (OSError, TimeoutError)):  # requests' errors are OSErrors
            return True
        if getattr(seen, "error_code", None) in ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED"):
            return True
        if re.search(r"error code 5\d\d|Max retries exceeded|Connection refused", str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Delivery:
    """An outbox entry into MLflow (each entry names its store and run, so any sender, or `distswitch
    sync`, delivers it): per-epoch metrics an earlier attempt already logged are skipped; the rest
    MLflow takes twice without harm (identical metrics are kept once, uploads overwrite; the model
    is logged unless the run has one)."""

    def __init__(self) -> None:
        self.clients: dict[str, object] = {}
        self.logged: dict[str, set[int]] = {}  # run id -> epochs MLflow had when this process first looked

    def __call__(self, entry: dict) -> None:
        from mlflow.entities import Metric

        uri, run_id = entry["uri"], entry["run_id"]
        client = self.clients.get(uri) or self.clients.setdefault(uri, mlflow_client(uri))
        if entry["kind"] == "metrics":
            if entry.get("epoch"):
                if run_id not in self.logged:
                    self.logged[run_id] = {m.step for m in client.get_metric_history(run_id, "val/acc")}
                if entry["step"] in self.logged[run_id]:
                    return
            batch = [Metric(k, float(v), entry["timestamp"], entry["step"]) for k, v in entry["metrics"].items()]
            for i in range(0, len(batch), 1000):
                client.log_batch(run_id, metrics=batch[i : i + 1000])
        elif entry["kind"] == "finish":
            log_results(client, uri, run_id, Path(entry["out_dir"]))
        elif entry["kind"] == "end":
            for key, value in entry.get("tags", {}).items():
                client.set_tag(run_id, key, value)
            client.set_terminated(run_id, entry["status"], end_time=entry["timestamp"])
        else:
            raise ValueError(f"unknown outbox entry {entry['kind']!r} (written by a newer distswitch?)")


def run_outbox(uri: str, out_dir: str | Path, name: str, log=None) -> Outbox:
    return Outbox(outbox_dir(out_dir), name, Delivery(), uri, transient=transient, log=log)


def _entry(kind: str, uri: str, run_id: str, **fields) -> dict:
    return {"kind": kind, "uri": uri, "run_id": run_id, "timestamp": int(time.time() * 1000), **fields}


class EpochLogger:
    """Rank 0's per-epoch metrics, by run id, through the run's outbox (out_dir/mlflow-outbox):
    an epoch blocks on nothing, whatever the server does."""

    def __init__(self, uri: str, run_id: str, out_dir: str | Path) -> None:
        self.uri, self.run_id = uri, run_id
        self.outbox = run_outbox(uri, out_dir, "rank0")
        # Epochs an earlier attempt put here (a relaunch on this node); MLflow's own are checked on delivery.
        self.logged = {e["step"] for e in self.outbox.journal.entries()
                       if e.get("epoch") and e["run_id"] == run_id}

    def log(self, metrics: dict[str, float], step: int) -> None:
        """`metrics` at `step`, unless an earlier attempt logged that step: an epoch trained again
        after a damaged checkpoint was skipped gives the same values, and a run keeps one per epoch."""
        if step in self.logged:
            return
        self.logged.add(step)
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.outbox.put(_entry("metrics", self.uri, self.run_id, step=step, metrics=values, epoch=True))

    def close(self, timeout: float) -> None:
        """Up to `timeout` seconds for the server to take what waits (the rest stays in the outbox:
        the driver, or `distswitch sync`, sends it)."""
        self.outbox.flush(timeout)
        self.outbox.close()


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """`metrics` at `step` now, synchronously (the driver's own figures, e.g. a search's summary)."""
    Delivery()(_entry("metrics", uri, run_id, step=step,
                      metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}))


def system_metrics_interval(cfg: Config) -> float | None:
    """Seconds between system-metrics samples on every node, None when off (tracking.system_metrics)."""
    return cfg.tracking.system_metrics_interval if cfg.tracking.system_metrics else None


def system_metrics(uri: str, run_id: str, out_dir: str | Path, node: str, interval: float):
    """MLflow's system-metrics monitor for one node of the run, as system/<node>/<metric>, every
    `interval` seconds (a daemon thread; `finish()` ends it), its steps continuing an earlier attempt's.
    Its samples go through the run's outbox (a journal per node): one taken while the server is away
    arrives when it is back. Not `mlflow.start_run(log_system_metrics=True)`: its run would be the
    process's active run, which `end_run` marks FINISHED, and the driver owns the run's status."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class NodeMonitor(SystemMetricsMonitor):
        def monitor(self) -> None:
            # MLflow's loop asks the server for the run's status after every sample and stops for
            # good when that fails (an outage); this one stops only at finish().
            while not self._shutdown_event.is_set():
                for _ in range(self.samples_before_logging):
                    self.collect_metrics()
                    if self._shutdown_event.wait(self.sampling_interval):
                        return
                self.publish_metrics(self.aggregate_metrics())

    # Its INFO lines (started, stopped, no GPU found) would reach the console from every node.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = NodeMonitor(run_id, sampling_interval=interval, resume_logging=True, node_id=node, tracking_uri=uri)
    # Quiet: rank 0's outbox already says when the server is away.
    monitor.mlflow_logger = _OutboxSamples(run_outbox(uri, out_dir, f"system-{node}", log=lambda line: None), uri, run_id)
    # Steps after those an earlier attempt on this node left unsent, too.
    monitor._logging_step = max(monitor._logging_step, monitor.mlflow_logger.next_step())
    monitor.start()
    return monitor


class _OutboxSamples:
    """Where the monitor records a sample (in place of MLflow's direct batch logger): the outbox."""

    data = ()  # what the monitor's debug lines read off MLflow's logger
    total_training_time = total_log_batch_time = 0.0

    def __init__(self, outbox: Outbox, uri: str, run_id: str) -> None:
        self.outbox, self.uri, self.run_id = outbox, uri, run_id

    def next_step(self) -> int:
        return max((e["step"] + 1 for e in self.outbox.journal.entries() if e.get("run_id") == self.run_id), default=0)

    def record_metrics(self, metrics: dict, step: int) -> None:
        self.outbox.put(_entry("metrics", self.uri, self.run_id, step=step, metrics=metrics))

    def flush(self, timeout: float = 5.0) -> None:
        """At the monitor's finish: a short wait; what the server did not take stays for the driver."""
        self.outbox.flush(timeout)
        self.outbox.close()


def finish_run(uri: str, run_id: str, out_dir: Path, summary: dict, timeout: float) -> bool:
    """Final metrics, the architecture, the compact model and the figures; then FINISHED; all through
    the outbox, waiting up to `timeout` seconds for the server. Whether it took everything (if not, one
    line says how to send the rest); an error no retry cures is raised."""
    values = {"test_acc": summary["test_acc"], "val_acc": summary["val_acc"], "kept": summary["kept_fraction"],
              "params": summary["compact"]["params"], "macs": summary["compact"]["macs"]}
    final = {**{BEST[k]: v for k, v in values.items()}, "best/epoch": summary["selected_epoch"],
             "test/acc": summary["test_acc"], "test/loss": summary["test_loss"],
             "dense/params": summary["dense"]["params"], "dense/macs": summary["dense"]["macs"]}
    outbox = run_outbox(uri, out_dir, "driver")
    outbox.put(_entry("metrics", uri, run_id, step=len(summary["history"]), metrics=final))
    outbox.put(_entry("finish", uri, run_id, out_dir=str(Path(out_dir).resolve())))
    outbox.put(_entry("end", uri, run_id, status="FINISHED"))
    return _wait(outbox, timeout)


def end_run(uri: str, run_id: str, out_dir: Path, timeout: float) -> bool:
    """The run marked FINISHED through the outbox (a search's, whose results went in directly)."""
    outbox = run_outbox(uri, out_dir, "driver")
    outbox.put(_entry("end", uri, run_id, status="FINISHED"))
    return _wait(outbox, timeout)


def _wait(outbox: Outbox, timeout: float) -> bool:
    try:
        if outbox.flush(timeout):
            return True
        if outbox.error is not None:
            raise outbox.error
    finally:
        outbox.close()
    print(f"distswitch: warning: MLflow at {outbox.where} did not take all of this run within {timeout:.0f} s "
          f"({outbox.last_error}); the rest waits in {outbox.journal.folder}: {sync_hint(outbox)}",
          file=sys.stderr, flush=True)
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
        outbox.put(_entry("end", uri, run_id, status=status, tags=tags))
        _check_reachable(uri)  # seconds: a Ctrl-C does not wait out a server that is gone
        _wait(outbox, timeout)
    except Exception as exc:
        if outbox is not None:
            outbox.close()
        where = f"; it waits in {outbox.journal.folder}: {sync_hint(outbox)}" if outbox is not None else ""
        print(f"distswitch: warning: could not mark MLflow run {run_id} {status} at {uri} ({type(exc).__name__}: "
              f"{str(exc)[:200]}){where}", file=sys.stderr)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=60,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
