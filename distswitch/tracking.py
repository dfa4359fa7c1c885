"""MLflow tracking: one run per training run, opened by the driver, fed by rank 0, closed by the driver.

The driver opens (or, for a resumed run, re-opens) the run and passes its id to the workers; only
rank 0 logs, by run id through an `MlflowClient` (no active-run global), so a worker-group restart
continues the same run instead of starting another (the trap in Ray issue #48664). Per-epoch
metrics are logged after the epoch's checkpoint is reported: an epoch that is re-run after a
restart was never logged before it. The driver logs the final artifacts and marks the run
FINISHED, FAILED (with the error) or KILLED.

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
from contextlib import contextmanager
from pathlib import Path

from distswitch import model_registry as registry
from distswitch.config import Config, ConfigError
from distswitch.io import atomic_path
from distswitch.signals import stop_signal
from distswitch.summary import width_label

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


def _dataset(summary: dict):
    """The run's data as an MLflow dataset (the Dataset column): name, where it was read from, the
    source's checksum from the prepared folder's metadata.json as digest, and the split sizes."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    data = summary["config"]["data"]
    folder = Path(data.get("beton_dir") or ".")
    meta = json.loads((folder / "metadata.json").read_text()) if (folder / "metadata.json").is_file() else None
    ffcv = summary.get("data_loader") == "ffcv" and meta is not None
    root = data.get("root")
    if ffcv:
        location = str(folder.resolve())
    elif root and Path(root).is_dir():
        location = Path(root).resolve().as_uri()
    else:
        location = root or f"({data['dataset']} default location)"
    sizes = dict(meta["counts"]) if ffcv else {"val": data.get("val_size")}
    sizes["train"] = summary["train_examples"]  # after data.train_limit

    class Splits(MetaDataset):
        @property
        def profile(self):
            return sizes

        def to_dict(self):
            return {**super().to_dict(), "profile": json.dumps(sizes)}

    with warnings.catch_warnings():  # a local path matches two of MLflow's local source kinds; either is right
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(location)
    digest = meta["source"]["sha256"][:16] if meta is not None else None
    return Splits(source, name=data["dataset"], digest=digest)


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


class EpochLogger:
    """Rank 0's per-epoch metrics, by run id."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client, self.run_id = mlflow_client(uri), run_id
        self.logged: set[int] | None = None  # epochs the run has already (a relaunch), read once

    def log(self, metrics: dict[str, float], step: int) -> None:
        """`metrics` at `step`, unless an earlier attempt logged that step: an epoch trained again
        after a damaged checkpoint was skipped gives the same values, and a run keeps one per epoch."""
        from mlflow.entities import Metric

        if self.logged is None:
            self.logged = {m.step for m in self.client.get_metric_history(self.run_id, "val/acc")}
        if step in self.logged:
            return
        self.logged.add(step)
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])


def system_metrics_interval(cfg: Config) -> float | None:
    """Seconds between system-metrics samples on every node, None when off (tracking.system_metrics)."""
    return cfg.tracking.system_metrics_interval if cfg.tracking.system_metrics else None


def system_metrics(uri: str, run_id: str, node: str, interval: float):
    """MLflow's system-metrics monitor for one node of the run, as system/<node>/<metric>, every
    `interval` seconds (a daemon thread; `finish()` ends it), its steps continuing an earlier attempt's.
    Not `mlflow.start_run(log_system_metrics=True)`: its run would be the process's active run, which
    `end_run` marks FINISHED, and the driver owns the run's status."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its INFO lines (started, stopped, no GPU found) would reach the console from every node.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True, node_id=node,
                                   tracking_uri=uri)
    monitor.start()
    return monitor


def finish_run(uri: str, run_id: str, out_dir: Path, summary: dict) -> None:
    """Final metrics, the architecture, the compact model and the figures; then FINISHED."""
    import mlflow
    import torch

    from distswitch.export import load_compact

    client = mlflow_client(uri)
    values = {"test_acc": summary["test_acc"], "val_acc": summary["val_acc"], "kept": summary["kept_fraction"],
              "params": summary["compact"]["params"], "macs": summary["compact"]["macs"]}
    final = {**{BEST[k]: v for k, v in values.items()}, "best/epoch": summary["selected_epoch"],
             "test/acc": summary["test_acc"], "test/loss": summary["test_loss"],
             "dense/params": summary["dense"]["params"], "dense/macs": summary["dense"]["macs"]}
    EpochLogger(uri, run_id).log(final, step=len(summary["history"]))
    from mlflow.entities import DatasetInput, InputTag

    dataset = _dataset(summary)._to_mlflow_entity()
    client.log_inputs(run_id, [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])])
    for name in ("summary.json", "model.arch.json"):
        client.log_artifact(run_id, str(out_dir / name))
    client.log_dict(run_id, {"kept_per_layer": summary["kept_per_layer"], "widths": summary["widths"]},
                    "architecture/kept.json")
    for path in figures(summary, out_dir / "figures"):
        client.log_artifact(run_id, str(path), "figures")
    model = load_compact(out_dir / "model.pt")
    arch = json.loads((out_dir / "model.arch.json").read_text())
    example = torch.zeros(2, arch["in_channels"], arch["image_size"], arch["image_size"]).numpy()
    register = summary["config"]["tracking"].get("register")
    with global_tracking_uri(uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
        # pt2 (torch.export): loading it runs no pickle, so needs none of our classes. MLflow's
        # default, except on Databricks: said explicitly. The signature comes from the example.
        info = mlflow.pytorch.log_model(model, name="model", input_example=example, serialization_format="pt2",
                                        conda_env=model_env(), registered_model_name=register,
                                        extra_files=[str(out_dir / "model.arch.json")])
    if register:
        registry.register(client, register, str(info.registered_model_version), summary)
    client.set_terminated(run_id, "FINISHED")


def model_env() -> dict:
    """The logged model's environment, declared: what loading a pt2 model needs (torch), so MLflow
    infers nothing (its inference looks for pip and uv and warns where they are missing)."""
    import platform
    from importlib.metadata import version

    # The installed distributions' versions (torch's own __version__ carries a local +cu tag pip
    # does not match against).
    return {"name": "distswitch-model", "channels": ["conda-forge"],
            "dependencies": [f"python={platform.python_version()}", "pip",
                             {"pip": [f"mlflow=={version('mlflow')}", f"torch=={version('torch')}"]}]}


@contextmanager
def global_tracking_uri(uri: str):
    """MLflow's global tracking URI set to `uri` for the block (log_model logs to the active run of
    the global URI). set_tracking_uri also exports MLFLOW_TRACKING_URI; both are put back exactly,
    or the next run in this process (tune trials, tests) would resolve its store from the leftover."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets both


def fail_run(uri: str, run_id: str, error: BaseException) -> None:
    """Mark the run FAILED (KILLED on Ctrl-C or a stop signal, named in a tag) with the error; called while `error` propagates, so a
    store that fails now only warns: the original error is the one to see."""
    try:
        _check_reachable(uri)  # seconds, where MLflow's client would retry for minutes
        client = mlflow_client(uri)
        client.set_tag(run_id, "distswitch.error", f"{type(error).__name__}: {error}"[:5000])
        if isinstance(error, KeyboardInterrupt):  # Ctrl-C, or a stop signal the CLI turned into one
            client.set_tag(run_id, "distswitch.signal", stop_signal().name)
        client.set_terminated(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
    except Exception as exc:
        print(f"distswitch: warning: could not mark MLflow run {run_id} failed at {uri} ({type(exc).__name__}: "
              f"{str(exc)[:200]})", file=sys.stderr)


def figures(summary: dict, folder: Path) -> list[Path]:
    """Kept units per layer (bars), accuracy and kept fraction per epoch (curves), factor histograms."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    layers = summary["kept_per_layer"]
    fig, ax = plt.subplots(figsize=(max(4, len(layers) * 0.6), 3.5))
    names = list(layers)
    ax.bar(range(len(names)), [layers[n]["units"] for n in names], color="#cccccc", label="units")
    ax.bar(range(len(names)), [layers[n]["kept"] for n in names], color="#1f77b4", label="kept")
    ax.set_xticks(range(len(names)), [width_label(n, layers[n]) for n in names], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("units")
    ax.set_title(f"kept {summary['kept_fraction']:.1%} of gated units")
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, folder / "kept_per_layer.png"))

    history = summary["history"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [h["epoch"] + 1 for h in history]
    ax.plot(epochs, [h["val_acc"] for h in history], marker="o", label="val acc")
    ax.plot(epochs, [h["kept_fraction"] for h in history], marker="s", label="kept fraction")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, folder / "accuracy_and_kept.png"))

    factors = summary.get("factor_histograms") or {}
    if factors:
        fig, axes = plt.subplots(1, len(factors), figsize=(3 * len(factors), 2.8), squeeze=False)
        for ax, (layer, hist) in zip(axes[0], factors.items()):
            ax.bar(hist["edges"][:-1], hist["counts"], width=[b - a for a, b in zip(hist["edges"], hist["edges"][1:])],
                   align="edge", label="on (> 0)")
            zeros = hist.get("zeros")  # summaries before the split have none
            if zeros:
                ax.bar([0], [zeros], width=(hist["edges"][-1] - hist["edges"][0]) / 40 or 0.02, color="#d62728",
                       label=f"off (= 0): {zeros}")
            ax.legend(fontsize=7)
            row = layers.get(layer)
            ax.set_title(width_label(layer, row) if row else layer, fontsize=8)
            ax.set_xlabel("factor")
        fig.tight_layout()
        paths.append(_save(fig, folder / "factor_histograms.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:  # its suffix tells savefig the format
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=60,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
