"""The default job, shortened to 4 epochs (1 warm-up, 2 switching, 1 fine-tuning), in-process,
through each loader one after the other: the same batches give the same accuracy, at each loader's speed.

    uv run python benchmarks/loader_band.py --out outputs/bench/loader_band.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from distswitch.config import load_config
from distswitch.worker import train

SHORT = [
    "train.progress=false",
    "train.device=cpu",
    "train.epochs=4",
    "schedule.warmup_epochs=1",
    "schedule.finetune_epochs=1",
    "tracking.enabled=false",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for both runs")
    args = parser.parse_args()
    report = {}
    for loader in ("ffcv", "torch"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(
                "configs/fashion_lenet5.yaml", [*SHORT, *args.overrides, f"data.loader={loader}", f"out_dir={tmp}/run"]
            )
            s = train(cfg)
        report[loader] = {
            k: s[k] for k in ("val_acc", "test_acc", "kept_fraction", "seconds_per_epoch", "images_per_s")
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
