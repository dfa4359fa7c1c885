"""Ray Train's own start-up floor: a trivial TorchTrainer (Linear(10, 1) under DDP over gloo, one
SGD step, one report) on a local cluster, timed from this process's creation.

The figure `distswitch train`'s start-up (benchmarks/startup.py) is measured against. Ray's
settings come from the environment and `--init` (ray.init keyword arguments as JSON); the
environment variables the package sets on a local cluster are applied with `--package-env`.

    uv run python benchmarks/ray_floor.py --out outputs/bench/ray_floor.json                 # Ray's defaults
    uv run python benchmarks/ray_floor.py --package-env --out outputs/bench/ray_floor_pkg.json
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1 uv run python benchmarks/ray_floor.py --init '{"include_dashboard": false}' ...
    T0=$(date +%s.%N) uv run torchrun --standalone --nproc-per-node=2 benchmarks/ray_floor.py --local-mode --out ...

`--local-mode`: Ray Train V2's local mode (`ScalingConfig(num_workers=0)`, no Ray cluster) in
processes torchrun starts; times count from T0 (the shell's launch) and each rank writes
OUT with its rank appended.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def process_started() -> float:
    """This process's creation, wall clock (from /proc; 10 ms resolution)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))


def train_fn(config: dict) -> None:
    first_line = time.time()
    started = process_started()
    import ray.train
    import ray.train.torch
    import torch

    model = ray.train.torch.prepare_model(torch.nn.Linear(10, 1))
    prepared = time.time()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(model(torch.randn(8, 10)), torch.randn(8, 1)).backward()
    opt.step()
    rank = ray.train.get_context().get_world_rank()
    Path(config["marks"], f"rank{rank}.json").write_text(
        json.dumps(
            {
                "worker_process": started,
                "first_line": first_line,
                "after_prepare_model": prepared,
                "first_step": time.time(),
            }
        )
    )
    ray.train.report({"done": 1})


def main() -> None:
    origin = process_started()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--init", default="{}", help="ray.init keyword arguments, JSON")
    parser.add_argument("--package-env", action="store_true", help="distswitch's local-cluster environment too")
    parser.add_argument(
        "--warm-coordinator",
        action="store_true",
        help="create Train's AutoscalingCoordinator right after ray.init (private API)",
    )
    parser.add_argument("--local-mode", action="store_true", help="under torchrun: no Ray cluster (num_workers=0)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.local_mode:
        return local_mode(args, float(os.environ.get("T0", origin)))
    if args.package_env:
        from distswitch.driver.cluster import DRIVER_ENV, LOCAL_CLUSTER_ENV

        for key, value in {**DRIVER_ENV, **LOCAL_CLUSTER_ENV}.items():
            os.environ.setdefault(key, value)
    t = {"script": time.time()}
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t["imported"] = time.time()
    ray.init(**json.loads(args.init))
    if args.warm_coordinator:  # the controller's first request_resources waits on it (5 s timeout)
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    t["ray_init"] = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TorchTrainer(
            train_fn,
            train_loop_config={"marks": tmp},
            scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
            run_config=RunConfig(storage_path=f"{tmp}/ray", name="floor"),
        )
        t["fit_called"] = time.time()
        trainer.fit()
        t["fit_returned"] = time.time()
        workers = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    ray.shutdown()
    t["shutdown"] = time.time()
    rel = lambda v: round(v - origin, 2)  # noqa: E731
    report = {
        "init": json.loads(args.init),
        "env": {k: v for k, v in os.environ.items() if k.startswith("RAY_")},
        **{k: rel(v) for k, v in t.items()},
        "workers": [{k: rel(v) for k, v in w.items()} for w in workers],
        "first_step": max(rel(w["first_step"]) for w in workers),
        "train_fn_reached": max(rel(w["first_line"]) for w in workers),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "imported",
                    "ray_init",
                    "fit_called",
                    "train_fn_reached",
                    "first_step",
                    "fit_returned",
                    "shutdown",
                )
            }
        )
    )


def local_mode(args, origin: float) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    imported = time.time()
    rank = int(os.environ.get("RANK", 0))
    with tempfile.TemporaryDirectory() as tmp:
        TorchTrainer(
            train_fn,
            train_loop_config={"marks": tmp},
            scaling_config=ScalingConfig(num_workers=0),
            run_config=RunConfig(storage_path=f"{tmp}/ray", name="floor"),
        ).fit()
        marks = json.loads(Path(tmp, f"rank{rank}.json").read_text())
    report = {
        "rank": rank,
        "imported": round(imported - origin, 2),
        "fit_returned": round(time.time() - origin, 2),
        **{k: round(v - origin, 2) for k, v in marks.items()},
    }
    out = Path(f"{args.out}.rank{rank}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
