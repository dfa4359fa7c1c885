"""Typed, frozen run configuration: YAML file + dotted overrides -> validated `Config`.

The config is validated once, before anything runs, and crosses process boundaries as a plain dict
(`Config.to_dict` / `Config.from_dict`). Names that depend on registries (models, datasets, methods,
switchers, optimisers) are checked against those registries by `build.validate_names`, so this
package stays at the top of the data flow and imports nothing else from distswitch.

    coerce.py   plain data -> typed dataclasses, one-line errors; dotted keys into nested dicts
    checks.py   ranges and cross-key rules
    schema.py   the sections and their defaults; Config
    load.py     YAML file + overrides -> Config
"""

from distswitch.config.coerce import ConfigError, set_dotted
from distswitch.config.load import load_config, merge_overrides, parse_override
from distswitch.config.schema import (
    BudgetConfig,
    Config,
    DataConfig,
    DistributedConfig,
    ModelConfig,
    OptimConfig,
    OptimizerConfig,
    PruneConfig,
    ScheduleConfig,
    SwitcherConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    channels_last_on,
)

__all__ = [
    "BudgetConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "ModelConfig",
    "OptimConfig",
    "OptimizerConfig",
    "PruneConfig",
    "ScheduleConfig",
    "SwitcherConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "channels_last_on",
    "load_config",
    "merge_overrides",
    "parse_override",
    "set_dotted",
]
