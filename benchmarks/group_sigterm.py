"""SIGTERM to a run's whole process group, again and again: `distswitch train` (the DDP test's LeNet5
config, 2 workers, 3 epochs) is started in a session of its own, and once epoch 1's checkpoint is
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
CONFIG = """\
model: {name: lenet5, gated: all}
method: switch
switcher: {arch: rowwise, width: 16, l1: 0.5}
schedule: {update_ratio: 1, warmup_epochs: 0, finetune_epochs: 0}
train: {epochs: 3, batch_size: 64, seed: 0, device: cpu, progress: false}
data: {dataset: fashion-mnist, train_limit: 6400}
distributed: {num_workers: 2, max_failures: 1}
"""


def one(folder: Path, index: int) -> int:
    out = folder / f"run{index}"
    snapshot = out / "ray" / out.name / "checkpoint_manager_snapshot.json"
    with (folder / f"run{index}.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "distswitch.cli", "train", str(folder / "config.yaml"),
                                 f"out_dir={out}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
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
    (folder / "config.yaml").write_text(CONFIG)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    codes = []
    for index in range(args.runs):
        codes.append(one(folder, index))
        print(f"run {index}: exit {codes[-1]}", flush=True)
    write_report({"runs": args.runs, "exit_codes": codes, "all_143": all(c == 143 for c in codes)}, args.out)
    return 0 if all(c == 143 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
