"""How long the driver's preflight takes to build a network with its unit groups, gates, switcher and
exact cost model (`distswitch.build.build` on the CPU, as the driver runs it before a cluster
starts), and how many groups it finds; each model in a fresh process, `--rounds` times, medians.

    uv run python benchmarks/preflight.py [--models resnet50 ...] [--image-size 224] [--rounds 3] [--out F]

The models are imported from the working directory first: run it from a checkout of another commit
(`git worktree add`) with `uv run --project THIS python THIS/benchmarks/preflight.py` to time that one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import environment, write_report

_ONE = """
import json, sys, time
import torch
from distswitch.build import build
from distswitch.config import Config
from distswitch.data.datasets import DatasetInfo
name, size, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = Config.from_dict({"model": {"name": name, "gated": "all"}, "budget": {"kind": kind, "fraction": 0.5},
                        "schedule": {"finetune_epochs": 1}, "train": {"device": "cpu", "progress": False}})
info = DatasetInfo("synthetic", 1000 if size >= 128 else 10, 3, size, (0.5,) * 3, (0.25,) * 3, "none")
start = time.perf_counter()
tnn, gates, method = build(cfg, info, 100, torch.device("cpu"))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "groups": len(gates.specs), "units": sum(s.units for s in gates.specs),
                  "coupled_groups": sum(1 for s in gates.specs if getattr(s, "writers", ()))}))
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet56", "vgg19", "mobilenet_v2", "resnet50"])
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 for resnet50, else 32")
    parser.add_argument("--kind", default="macs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = {}
    for name in args.models:
        size = args.image_size or (224 if name == "resnet50" else 32)
        runs = []
        for _ in range(args.rounds):
            out = subprocess.run(
                [sys.executable, "-c", _ONE, name, str(size), args.kind], capture_output=True, text=True, check=True
            ).stdout
            runs.append(json.loads(out.splitlines()[-1]))
        rows[name] = {
            **{k: v for k, v in runs[0].items() if k != "seconds"},
            "image_size": size,
            "seconds": [r["seconds"] for r in runs],
            "median_seconds": statistics.median(r["seconds"] for r in runs),
        }
        print(
            f"{name:14s} {size:4d}px  {rows[name]['groups']:4d} groups ({rows[name]['coupled_groups']} coupled)  "
            f"build {rows[name]['median_seconds']:.2f} s",
            file=sys.stderr,
        )
    result = {"kind": args.kind, "models": rows, **environment()}
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    main()
