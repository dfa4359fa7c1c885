"""What a run logs to MLflow between its opening and its end, and how it gets there.

Everything goes through the run's outbox (out_dir/mlflow-outbox, `distswitch.outbox`): on disk first,
then sent by a background thread that retries, so a server that is away blocks no epoch and loses
nothing. Here: the entries and their delivery into MLflow, rank 0's per-epoch metrics, and each
node's system metrics. Opening and ending the run is `distswitch.tracking`'s.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from distswitch.config import Config
from distswitch.outbox import Outbox
from distswitch.run_results import log_results


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


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


def outbox_entry(kind: str, uri: str, run_id: str, **fields) -> dict:
    return {"kind": kind, "uri": uri, "run_id": run_id, "timestamp": int(time.time() * 1000), **fields}


class EpochLogger:
    """Rank 0's per-epoch metrics, by run id, through the run's outbox (out_dir/mlflow-outbox):
    an epoch blocks on nothing, whatever the server does."""

    def __init__(self, uri: str, run_id: str, out_dir: str | Path) -> None:
        self.uri, self.run_id = uri, run_id
        self.outbox = run_outbox(uri, out_dir, "rank0")
        # Epochs an earlier attempt put here (a relaunch on this node); MLflow's own are checked on delivery.
        self.logged = {e["step"] for e in self.outbox.journal.entries() if e.get("epoch") and e["run_id"] == run_id}

    def log(self, metrics: dict[str, float], step: int) -> None:
        """`metrics` at `step`, unless an earlier attempt logged that step: an epoch trained again
        after a damaged checkpoint was skipped gives the same values, and a run keeps one per epoch."""
        if step in self.logged:
            return
        self.logged.add(step)
        values = _numbers(metrics)
        self.outbox.put(outbox_entry("metrics", self.uri, self.run_id, step=step, metrics=values, epoch=True))

    def close(self, timeout: float) -> None:
        """Up to `timeout` seconds for the server to take what waits (the rest stays in the outbox:
        the driver, or `distswitch sync`, sends it)."""
        self.outbox.flush(timeout)
        self.outbox.close()


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """`metrics` at `step` now, synchronously (the driver's own figures, e.g. a search's summary)."""
    Delivery()(
        outbox_entry(
            "metrics",
            uri,
            run_id,
            step=step,
            metrics=_numbers(metrics),
        )
    )


def _numbers(metrics: dict) -> dict[str, float]:
    """The numeric entries of `metrics`, as floats (MLflow takes nothing else as a metric)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


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
    monitor.mlflow_logger = _OutboxSamples(
        run_outbox(uri, out_dir, f"system-{node}", log=lambda line: None), uri, run_id
    )
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
        self.outbox.put(outbox_entry("metrics", self.uri, self.run_id, step=step, metrics=metrics))

    def flush(self, timeout: float = 5.0) -> None:
        """At the monitor's finish: a short wait; what the server did not take stays for the driver."""
        self.outbox.flush(timeout)
        self.outbox.close()
