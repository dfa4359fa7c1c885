"""A config from a YAML file and dotted overrides (`train.epochs=3`), validated once."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from distswitch.config.coerce import ConfigError, describe, set_dotted
from distswitch.config.schema import Config


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; users mean a number (as in YAML 1.2 and Python)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.epochs=3' -> (['train', 'epochs'], 3); the value is parsed as YAML (3, 0.1, true, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, float) and math.isnan(value):
        value = float("nan")
    return key.split("."), value


def merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = _deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(merged, path, value, f"override {text!r}")
    return merged


def _deepcopy(data: Any) -> Any:
    return {k: _deepcopy(v) for k, v in data.items()} if isinstance(data, dict) else data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (None = all defaults), apply dotted overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {str(p)!r} does not exist; pass a YAML file such as configs/fashion_lenet5.yaml"
            )
        try:
            data = _yaml_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {str(p)!r}: expected a mapping of sections (model:, train:, ...), "
                f"got {describe(type(data))}"
            )
    merged = merge_overrides(data, list(overrides))
    tracking = merged.get("tracking") or {}
    if path is not None and isinstance(tracking, dict) and tracking.get("experiment") is None:
        # Runs of one config compare in one experiment, named after the file.
        set_dotted(merged, ["tracking", "experiment"], Path(path).stem, "tracking")
    return Config.from_dict(merged)
