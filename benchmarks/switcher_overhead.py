"""Switcher overhead: seconds per training epoch of switch-training against dense training of the
same model, on the same loader and batch, side by side in one process.

Epochs alternate dense, switch, dense, switch, ... after one untimed warm-up epoch each (FFCV's
compile, allocator warm-up), so drift in the machine's speed hits both alike. Only the training
loop is timed (`EpochStats.seconds`), not validation.

    uv run python benchmarks/switcher_overhead.py [--config C] [--rounds 3] [--train-limit N] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from distswitch.config import load_config
from distswitch.data import make_loaders
from distswitch.engine import Engine
from distswitch.run import build, resolve_device, seed_everything


def engine_for(config: str, method: str, overrides: list[str]):
    cfg = load_config(config, [f"method={method}", "schedule.warmup_epochs=0", "schedule.finetune_epochs=0",
                               "train.progress=false", f"out_dir={tempfile.mkdtemp()}/run", *overrides])
    device = resolve_device(cfg)
    seed_everything(cfg.train.seed)
    loaders = make_loaders(cfg, 0, 1, device)
    tnn, gates, meth = build(cfg, loaders.info, len(loaders.train), device)
    return cfg, Engine(cfg, tnn, gates, meth, device), loaders


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_lenet5.yaml")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per method")
    parser.add_argument("--train-limit", type=int, default=None, help="training examples (default: all)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs, e.g. train.batch_size=64")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, f"train.epochs={args.rounds + 1}"]
    if args.train_limit:
        overrides.append(f"data.train_limit={args.train_limit}")
    runs = {m: engine_for(args.config, m, overrides) for m in ("dense", "switch")}
    seconds: dict[str, list[float]] = {m: [] for m in runs}
    steps = {}
    for epoch in range(args.rounds + 1):
        for method, (cfg, engine, loaders) in runs.items():
            stats = engine.train_epoch(epoch, loaders.train, loaders.val)
            steps[method] = stats.steps
            if epoch > 0:  # epoch 0 warms up (FFCV compiles its pipeline)
                seconds[method].append(stats.seconds)
    cfg = runs["switch"][0]
    median = {m: statistics.median(v) for m, v in seconds.items()}
    result = {
        "model": cfg.model.name, "dataset": cfg.data.dataset, "loader": cfg.data.loader,
        "batch_size": cfg.train.batch_size, "update_ratio": cfg.schedule.update_ratio,
        "switcher": {"arch": cfg.switcher.arch, "width": cfg.switcher.width, "granularity": cfg.switcher.granularity},
        "train_examples": runs["switch"][2].train_examples, "steps_per_epoch": steps,
        "seconds_per_epoch": seconds, "median_seconds_per_epoch": median,
        "switch_over_dense": median["switch"] / median["dense"],
        "device": str(runs["switch"][1].device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
