"""What the training benchmarks share: one engine built the way a worker builds it, in this process,
and the environment every report records."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import torch

from distswitch.build import build, resolve_device, seed_everything
from distswitch.config import Config, load_config
from distswitch.data import check_data, make_loaders
from distswitch.engine import Engine
from distswitch.process import configure_process


def engine_for(config: str, overrides: list[str], loaders: bool = True, steady: bool = True, heap: bool = True):
    """(cfg, engine, loaders or None) for `config` + `overrides`, one process, outputs in a temporary
    folder. steady: no warm-up or fine-tuning epochs and no budget (every epoch trains the same way)
    unless the overrides set them; otherwise the config's own schedule. heap=False: glibc's default
    heap instead of the worker's (`distswitch.process.keep_freed_memory`), to measure the difference."""
    # Steady: no budget either (its cut freezes the factors, and a frozen switcher costs nothing).
    plain = ["schedule.warmup_epochs=0", "schedule.finetune_epochs=0", "budget.fraction=null"] if steady else []
    cfg = load_config(config, [*plain, "train.progress=false", f"out_dir={tempfile.mkdtemp()}/run", *overrides])
    device = resolve_device(cfg)
    configure_process(device, heap=heap)  # as a worker sets it
    seed_everything(cfg.train.seed)
    if loaders:
        built = make_loaders(cfg, 0, 1, device)
        info, steps = built.info, len(built.train)
    else:  # the prepared data's shape and classes, as the launcher reads them
        built = None
        info, steps = check_data(cfg, 1)
    tnn, gates, meth = build(cfg, info, steps, device)
    return cfg, Engine(cfg, tnn, gates, meth, device), built


def environment(cfg: Config | None = None) -> dict:
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_report(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
