"""Start-up overhead of `distswitch train`: launch to the first training step, with its timeline.

Runs the real command (one short epoch) side by side for: a fresh local cluster with 1 and 2
workers, then 2 workers joining a head started beforehand (`ray start --head`, as on a cluster).
Every figure is read from the run's summary.json (`startup_timeline`, seconds since the driver
process started).

    uv run python benchmarks/startup.py --out outputs/startup [--repeats 2] [--loaders ffcv torch]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHORT = ["train.epochs=1", "schedule.warmup_epochs=0", "schedule.finetune_epochs=0", "data.train_limit=1024",
         "train.progress=false"]
MARKS = ["driver_ready", "ray_connected", "fit_called", "worker_started", "data_loaded", "model_built",
         "replicas_ready", "first_step"]


def run(label: str, out: Path, workers: int, env: dict, loader: str) -> dict:
    # Absolute: on a joined cluster relative data paths are the workers' business (cluster/README.md).
    cmd = ["distswitch", "train", "configs/fashion_lenet5.yaml", *SHORT, f"distributed.num_workers={workers}",
           f"data.loader={loader}", f"data.beton_dir={REPO / 'data/ffcv/fashion-mnist'}", f"out_dir={out / label}"]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run([str(BIN / "distswitch"), *cmd[1:]], check=True, cwd=REPO, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / label / "summary.json").read_text())
    return {"label": label, "command": shlex.join(cmd), "timeline": summary["startup_timeline"],
            "startup_seconds": summary["startup_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--loaders", nargs="+", default=["ffcv", "torch"], help="data.loader values to compare")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    rows = []
    for r in range(args.repeats):
        for loader in args.loaders:
            rows.append(run(f"local-1w-{loader}-{r}", args.out, 1, env, loader))
            rows.append(run(f"local-2w-{loader}-{r}", args.out, 2, env, loader))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head_env = {**env, "RAY_AUTH_MODE": "token", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"], check=True,
                   env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for r in range(args.repeats):
            for loader in args.loaders:
                rows.append(run(f"head-2w-{loader}-{r}", args.out, 2, {**head_env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                                loader))
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=head_env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    head = "| run | " + " | ".join(MARKS) + " |\n|---|" + "---|" * len(MARKS)
    lines = [head] + [f"| {r['label']} | " + " | ".join(f"{r['timeline'].get(m, float('nan')):.1f}" for m in MARKS) + " |"
                      for r in rows]
    table = "\n".join(lines)
    (args.out / "startup.md").write_text(table + "\n")
    (args.out / "startup.json").write_text(json.dumps(rows, indent=2))
    print(table)


if __name__ == "__main__":
    main()
