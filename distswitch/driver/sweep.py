"""`distswitch sweep`: the comparison every user of a pruning method makes, methods (or named
variants) x budgets x seeds, as one Ray Tune experiment (`driver.tune` runs it: each trial a normal
training run with its own workers, as many at once as the cluster holds, a killed sweep resumed by
the same command, one MLflow parent run with a child per trial). What is sweep-specific is here: the
grid, what a variant sets, the checks before anything runs, and the comparison at the end (the
table and figure `distswitch compare` draws, from the trials' summaries).
"""

from __future__ import annotations

import json
from pathlib import Path

from distswitch.build import validate_names
from distswitch.compare import aggregate, figure, table
from distswitch.config import Config, ConfigError, set_dotted
from distswitch.config.schema import SWEEP_VARIANTS
from distswitch.io import write_text
from distswitch.registry import UnknownNameError

VARIANT_KEY = "sweep.variant"  # the grid's key for the method or variant a trial runs


def grid(cfg: Config) -> dict:
    """Every method x budget x seed, once each (Tune's grid search)."""
    from ray import tune

    s = cfg.sweep
    return {
        VARIANT_KEY: tune.grid_search(list(s.methods)),
        "budget.fraction": tune.grid_search(list(s.budgets)),
        "train.seed": tune.grid_search(list(s.seeds)),
    }


def apply_variant(data: dict, name: str) -> None:
    """A variant's overrides into a trial's config data (a registered method's name sets `method`)."""
    variants = {**SWEEP_VARIANTS, **(data.get("sweep") or {}).get("variants", {})}
    for key, value in variants.get(name, {"method": name}).items():
        set_dotted(data, key.split("."), value, f"sweep.variants.{name}.{key}")
    data["sweep"] = {**(data.get("sweep") or {}), "variant": name}


def check(cfg: Config) -> None:
    """Every trial's config valid before anything runs (one line, exit 2, for a bad one)."""
    s = cfg.sweep
    for key in ("methods", "budgets", "seeds"):
        if not getattr(s, key):
            raise ConfigError(f"sweep.{key}: empty; give at least one, e.g. sweep.{key}=[...]")
    known = {**SWEEP_VARIANTS, **s.variants}
    for name in s.methods:
        data = cfg.to_dict()
        apply_variant(data, name)
        try:
            for budget in s.budgets:
                data["budget"] = {**data.get("budget", {}), "fraction": budget}
                validate_names(Config.from_dict(data))
        except UnknownNameError as exc:
            if name not in known:
                raise ConfigError(
                    f"sweep.methods: unknown {name!r}; name a registered method or a variant "
                    f"({', '.join(sorted(known))}, or your own in sweep.variants)"
                ) from None
            raise ConfigError(f"sweep.variants.{name}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"sweep.methods: {name!r}: {exc}") from None


def comparison(trials_dir: Path, out: Path, title: str) -> dict | None:
    """The finished trials' test accuracy against compact MACs and params, seeds aggregated per
    variant and budget: out/compare.md and out/compare.png; None before any trial finished."""
    records = []
    for path in sorted(Path(trials_dir).glob("*/summary.json")):
        s = json.loads(path.read_text())
        variant = (s["config"].get("sweep") or {}).get("variant") or s["config"]["method"]
        budget = s["config"]["budget"].get("fraction")
        records.append(
            {
                "model": s["config"]["model"]["name"],
                "method": variant,
                "budget": budget,
                "seed": s["config"]["train"]["seed"],
                "setting": (("variant", variant), ("budget", budget)),
                "test_acc": s["test_acc"],
                "macs": s["compact"]["macs"],
                "params": s["compact"]["params"],
                "dense_macs": s["dense"]["macs"],
                "dense_params": s["dense"]["params"],
            }
        )
    if not records:
        return None
    rows = aggregate(records)
    text = table(rows)
    write_text(out / "compare.md", text + "\n")
    path = figure(rows, out / "compare.png", title=title)
    return {"rows": rows, "table": text, "figure": str(path)}
