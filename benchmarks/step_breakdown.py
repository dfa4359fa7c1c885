"""Where switch-training's extra time per step goes: one step of dense training against a switch
TNN step, a switch TNN step with the factors cached (the gate hooks' cost alone), a switch SNN step,
and the switcher's forward pass alone, on one fixed batch, interleaved in one process.

    uv run python benchmarks/step_breakdown.py [--config C] [--threads N] [--rounds 8] [--steps 30] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from distswitch.config import load_config
from distswitch.data import check_data
from distswitch.engine import Engine
from distswitch.run import build, seed_everything
from distswitch.schedule import Phase


def engine_for(config: str, method: str, overrides: list[str]) -> Engine:
    cfg = load_config(config, [f"method={method}", "schedule.warmup_epochs=0", "schedule.finetune_epochs=0",
                               "train.device=cpu", f"out_dir={tempfile.mkdtemp()}/run", *overrides])
    seed_everything(cfg.train.seed)
    info, steps = check_data(cfg, 1)  # the prepared data's shape and classes, as the launcher reads them
    tnn, gates, meth = build(cfg, info, steps, torch.device("cpu"))
    return Engine(cfg, tnn, gates, meth, torch.device("cpu"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_lenet5.yaml")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="steps per timed block")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, switch, cached = (engine_for(args.config, m, args.overrides) for m in ("dense", "switch", "switch"))
    info, _ = check_data(dense.cfg, 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(dense.cfg.train.batch_size, info.channels, info.image_size, info.image_size, generator=gen)
    y = torch.randint(0, info.num_classes, (len(x),), generator=gen)
    factors = cached.compute_factors(0)
    cached.compute_factors = lambda epoch, phase=None: factors  # the hooks run, the switcher does not

    def switcher_only():
        with torch.no_grad():
            switch.source(switch.gates.weights())

    blocks = {
        "dense step": lambda: dense.step(0, Phase.TNN, x, y),
        "switch TNN step": lambda: switch.step(0, Phase.TNN, x, y),
        "switch TNN step, factors cached": lambda: cached.step(0, Phase.TNN, x, y),
        "switch SNN step": lambda: switch.step(0, Phase.SNN, x, y),
        "switcher forward (no grad)": switcher_only,
    }
    ms: dict[str, list[float]] = {k: [] for k in blocks}
    for fn in blocks.values():
        for _ in range(10):  # warm-up: allocator, first-call paths
            fn()
    for _ in range(args.rounds):
        for name, fn in blocks.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            ms[name].append((time.perf_counter() - start) / args.steps * 1e3)
    median = {k: statistics.median(v) for k, v in ms.items()}
    result = {"config": args.config, "overrides": args.overrides, "batch_size": len(x), "threads": args.threads,
              "gates": [(s.layer, s.side, s.units, s.fan) for s in switch.gates.specs],
              "median_ms": median, "ms": ms, "torch": torch.__version__, "cpus": os.cpu_count(),
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name, value in median.items():
        print(f"{name:34s} {value:7.2f} ms  ({value / median['dense step']:.2f} x dense)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
