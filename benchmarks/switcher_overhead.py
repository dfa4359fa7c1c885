"""Switcher overhead: seconds per training epoch of switch-training against dense training of the
same model, on the same loader and batch, side by side in one process.

Three variants: dense; switch (eager); switch with its switcher compiled (`train.compile=switcher`;
the TNN runs eagerly in all three, so only the switcher's cost differs). Epochs rotate through
them after one untimed warm-up epoch each (FFCV's pipeline and torch.compile's graphs are built
there), so drift in the machine's speed hits all alike. Only the training loop is timed
(`EpochStats.seconds`), not validation. --default-heap: glibc's default heap instead of the one a
worker trains with (`distswitch.process.keep_freed_memory`), to measure what it changes.

    uv run python benchmarks/switcher_overhead.py [--config C] [--rounds 3] [--train-limit N]
        [--no-compile] [--default-heap] [--out F] [overrides ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from common import engine_for, environment, write_report

VARIANTS = {
    "dense": ["method=dense"],
    "switch": ["method=switch"],
    "switch_compiled": ["method=switch", "train.compile=switcher"],
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_lenet5.yaml")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per method")
    parser.add_argument("--train-limit", type=int, default=None, help="training examples (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled-switcher variant")
    parser.add_argument("--default-heap", action="store_true", help="glibc's default heap, not the worker's")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs, e.g. train.batch_size=64")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, f"train.epochs={args.rounds + 1}"]
    if args.train_limit:
        overrides.append(f"data.train_limit={args.train_limit}")
    names = [v for v in VARIANTS if not (args.no_compile and v == "switch_compiled")]
    runs = {v: engine_for(args.config, [*VARIANTS[v], *overrides], heap=not args.default_heap) for v in names}
    seconds: dict[str, list[float]] = {m: [] for m in runs}
    warmup: dict[str, float] = {}  # the untimed first epoch: FFCV's and torch.compile's build cost shows here
    steps = {}
    for epoch in range(args.rounds + 1):
        for method, (_cfg, engine, loaders) in runs.items():
            stats = engine.train_epoch(epoch, loaders.train, loaders.val)
            steps[method] = stats.steps
            if epoch > 0:  # epoch 0 warms up (FFCV and torch.compile build their code)
                seconds[method].append(stats.seconds)
            else:
                warmup[method] = stats.seconds
    cfg = runs["switch"][0]
    median = {m: statistics.median(v) for m, v in seconds.items()}
    result = {
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "loader": cfg.data.loader,
        "batch_size": cfg.train.batch_size,
        "update_ratio": cfg.schedule.update_ratio,
        "switcher": {"arch": cfg.switcher.arch, "width": cfg.switcher.width, "granularity": cfg.switcher.granularity},
        "train_examples": runs["switch"][2].train_examples,
        "steps_per_epoch": steps,
        "seconds_per_epoch": seconds,
        "median_seconds_per_epoch": median,
        "warmup_epoch_seconds": warmup,
        "switch_over_dense": median["switch"] / median["dense"],
        **(
            {"switch_compiled_over_dense": median["switch_compiled"] / median["dense"]}
            if "switch_compiled" in median
            else {}
        ),
        "heap": "glibc default" if args.default_heap else "kept",
        "device": str(runs["switch"][1].device),
        **environment(),
    }
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
