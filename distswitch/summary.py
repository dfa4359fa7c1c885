"""A finished run's summary (out_dir/summary.json): one typed record.

Rank 0 fills what the workers know (`Summary.of_run`); the driver adds what only it knows (where
Ray stored the final checkpoint, the MLflow run) and writes the file once. JSON keys are the field
names; the driver's fields are left out while unset, so a run without tracking has no `mlflow` key.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from distswitch.config import ConfigError
from distswitch.io import write_json

DRIVER_FIELDS = ("checkpoint_path", "mlflow")
SUMMARY_FORMAT = "distswitch.summary/1"  # raised when a field changes meaning or goes


def width_label(layer: str, row: dict) -> str:
    """How a gated layer is shown to a person: its name and its units before -> after, 'fc1 500→290'."""
    return f"{layer} {row['units']}→{row['kept']}"


def widths_line(layers: dict, limit: int = 6) -> str:
    """Every gated group's width for a few groups; for many (a ResNet-50 has 37), the cut ones, the
    most cut first, at most `limit`, and a count of the rest: a console line a person can read."""
    if len(layers) <= limit:
        return ", ".join(width_label(layer, row) for layer, row in layers.items())
    cut = sorted(
        (layer for layer, row in layers.items() if row["kept"] < row["units"]),
        key=lambda layer: layers[layer]["kept"] / max(layers[layer]["units"], 1),
    )
    shown = [width_label(layer, layers[layer]) for layer in cut[:limit]]
    rest = len(cut) - len(shown)
    whole = len(layers) - len(cut)
    tail = ([f"{rest} more cut"] if rest else []) + ([f"{whole} of {len(layers)} groups whole"] if whole else [])
    return ", ".join(shown + tail)


@dataclass
class Summary:
    model: str
    method: str
    dataset: str
    device: str
    workers: int
    selected_epoch: int | None
    resumed_at_epoch: int  # the epoch this worker group started at: > 0 after a restart or relaunch
    val_acc: float
    test_acc: float
    test_loss: float
    # The compact model (export): kept units, sizes, the equivalence check, widths.
    kept_fraction: float
    kept_units: int
    gated_units: int
    kept_per_layer: dict
    dense: dict
    compact: dict
    export_max_abs_diff: float
    model_path: str
    widths: dict
    # Start-up: seconds from the launch to the first step, the origin's wall clock, the timeline.
    startup_seconds: float | None
    startup_origin: float | None
    startup_timeline: dict
    seconds_per_epoch: float
    images_per_s: float
    comm_bytes_per_step: dict
    train_examples: int
    data_loader: str
    git_sha: str | None
    factor_histograms: dict
    torch: str
    out_dir: str
    history: list[dict]
    config: dict
    checkpoint_path: str | None = None
    mlflow: dict | None = None
    format: str = SUMMARY_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer writer, kept as they are

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        for key in DRIVER_FIELDS:
            if d[key] is None:
                del d[key]
        return {**d, **extra}

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
        if d.get("format") != SUMMARY_FORMAT:
            raise ConfigError(
                f"a summary of format {d.get('format')!r}: written by another version of distswitch "
                f"(this one reads {SUMMARY_FORMAT!r})"
            )
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def read(cls, path: str | Path) -> "Summary":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def write(self, path: str | Path) -> None:
        write_json(Path(path), self.to_dict())
