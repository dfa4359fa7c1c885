"""Time to accuracy: training seconds until the test accuracy first reaches a target, dense and
switch training of the same model side by side in one process (their epochs alternate), with the
switch's kept fraction at that epoch.

Each run follows its config's own schedule (warm-up, fine-tuning, learning-rate decay over
train.epochs) and stops at the first epoch whose test accuracy reaches --target, or at
train.epochs. The test set is measured after every epoch for this figure only; training runs never
select on it. "train s" adds up the training loops (EpochStats.seconds); "wall s" adds validation
and the test pass.

    uv run python benchmarks/time_to_accuracy.py [--config C] [--target 0.90] [--out F] [overrides ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

from common import engine_for, environment, write_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_lenet5.yaml")
    parser.add_argument("--target", type=float, default=0.90, help="test accuracy to reach")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs, e.g. train.epochs=20")
    args = parser.parse_args(argv)
    runs = {m: engine_for(args.config, [f"method={m}", *args.overrides], steady=False) for m in ("dense", "switch")}
    epochs = {m: [] for m in runs}
    reached: dict[str, dict | None] = {m: None for m in runs}
    train_s = {m: 0.0 for m in runs}
    wall_s = {m: 0.0 for m in runs}
    for epoch in range(max(cfg.train.epochs for cfg, _, _ in runs.values())):
        for method, (cfg, engine, loaders) in runs.items():
            if reached[method] is not None or epoch >= cfg.train.epochs:
                continue
            start = time.perf_counter()
            stats = engine.train_epoch(epoch, loaders.train, loaders.val)
            _, test_acc = engine.evaluate(loaders.test, epoch)
            wall_s[method] += time.perf_counter() - start
            train_s[method] += stats.seconds
            row = {
                "epoch": epoch + 1,
                "train_s": round(train_s[method], 2),
                "wall_s": round(wall_s[method], 2),
                "test_acc": round(test_acc, 4),
                "val_acc": round(stats.val_acc, 4),
                "kept_fraction": round(stats.kept_fraction, 4),
                "gated": stats.gated,
            }
            epochs[method].append(row)
            print(f"{method:6s} {row}", flush=True)
            if test_acc >= args.target:
                reached[method] = row
    cfg = runs["switch"][0]
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "target_test_acc": args.target,
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "loader": cfg.data.loader,
        "batch_size": cfg.train.batch_size,
        "schedule": asdict(cfg.schedule),
        "epochs_max": cfg.train.epochs,
        "reached": reached,
        "epochs": epochs,
        "device": str(runs["switch"][1].device),
        **environment(),
    }
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
