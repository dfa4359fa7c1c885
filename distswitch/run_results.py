"""What a finished run leaves in MLflow besides its metrics: its dataset, its files and figures, and
the compact model (registered when `tracking.register` names a model)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from distswitch import model_registry as registry
from distswitch.io import atomic_path
from distswitch.summary import width_label


def log_results(client, uri: str, run_id: str, out_dir: Path) -> None:
    """The run's dataset, files, figures and compact model (registered when the config says)."""
    import mlflow
    import torch
    from mlflow.entities import DatasetInput, InputTag

    from distswitch.export import load_compact

    summary = json.loads((out_dir / "summary.json").read_text())
    dataset = _dataset(summary)._to_mlflow_entity()
    client.log_inputs(run_id, [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])])
    for name in ("summary.json", "model.arch.json"):
        client.log_artifact(run_id, str(out_dir / name))
    client.log_dict(
        run_id, {"kept_per_layer": summary["kept_per_layer"], "widths": summary["widths"]}, "architecture/kept.json"
    )
    for path in figures(summary, out_dir / "figures"):
        client.log_artifact(run_id, str(path), "figures")
    experiment = client.get_run(run_id).info.experiment_id
    if client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'", max_results=1):
        return  # a delivery repeated after the model went in
    model = load_compact(out_dir / "model.pt")
    arch = json.loads((out_dir / "model.arch.json").read_text())
    example = torch.zeros(2, arch["in_channels"], arch["image_size"], arch["image_size"]).numpy()
    register = summary["config"]["tracking"].get("register")
    with global_tracking_uri(uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
        # pt2 (torch.export): loading it runs no pickle, so needs none of our classes. MLflow's
        # default, except on Databricks: said explicitly. The signature comes from the example.
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example,
            serialization_format="pt2",
            conda_env=model_env(),
            registered_model_name=register,
            extra_files=[str(out_dir / "model.arch.json")],
        )
    if register:
        registry.register(client, register, str(info.registered_model_version), summary)


def model_env() -> dict:
    """The logged model's environment, declared: what loading a pt2 model needs (torch), so MLflow
    infers nothing (its inference looks for pip and uv and warns where they are missing)."""
    import platform
    from importlib.metadata import version

    # The installed distributions' versions (torch's own __version__ carries a local +cu tag pip
    # does not match against).
    return {
        "name": "distswitch-model",
        "channels": ["conda-forge"],
        "dependencies": [
            f"python={platform.python_version()}",
            "pip",
            {"pip": [f"mlflow=={version('mlflow')}", f"torch=={version('torch')}"]},
        ],
    }


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
            ax.bar(
                hist["edges"][:-1],
                hist["counts"],
                width=[b - a for a, b in zip(hist["edges"], hist["edges"][1:])],
                align="edge",
                label="on (> 0)",
            )
            zeros = hist.get("zeros")  # summaries before the split have none
            if zeros:
                ax.bar(
                    [0],
                    [zeros],
                    width=(hist["edges"][-1] - hist["edges"][0]) / 40 or 0.02,
                    color="#d62728",
                    label=f"off (= 0): {zeros}",
                )
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
