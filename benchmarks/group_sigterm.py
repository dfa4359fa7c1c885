"""SIGTERM to a run's whole process group, again and again: `distswitch train` (the default job,
LeNet5, 2 workers, 3 epochs) is started in a session of its own, and once epoch 1's checkpoint is
registered, after a random 0-1.5 s, the group gets SIGTERM. Each run must end with 143 (128 + 15).

    uv run python benchmarks/group_sigterm.py [--runs 10] [--out F]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_report

ROOT = Path(__file__).resolve().parents[1]
# The default job, shortened to the DDP test's size: 2 workers, 3 epochs of 6,400 images.
SHORT = [
    "train.epochs=3",
    "data.train_limit=6400",
    "distributed.num_workers=2",
    "distributed.max_failures=1",
    "train.progress=false",
    "train.device=cpu",
]


def one(folder: Path, index: int) -> int:
    out = folder / f"run{index}"
    snapshot = out / "ray" / out.name / "checkpoint_manager_snapshot.json"
    with (folder / f"run{index}.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distswitch.cli", "train", "configs/fashion_lenet5.yaml", *SHORT, f"out_dir={out}"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while not (snapshot.is_file() and '"epoch_0000"' in snapshot.read_text()) and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(random.uniform(0, 1.5))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="group-sigterm-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    codes = []
    for index in range(args.runs):
        codes.append(one(folder, index))
        print(f"run {index}: exit {codes[-1]}", flush=True)
    write_report({"runs": args.runs, "exit_codes": codes, "all_143": all(c == 143 for c in codes)}, args.out)
    return 0 if all(c == 143 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
