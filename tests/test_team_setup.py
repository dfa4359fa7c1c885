"""cluster/README.md's team setup, run as written: the tracking server, a run registered in the model
registry, a sweep, the runs table and the best model loaded by plain MLflow. Shortened the way a test
can afford: short trainings, a free port, a scratch out_dir, the project's environment instead of `uv run`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.slow

MARK = "make tracking-server &"
SHORT = (
    "train.epochs=3 data.train_limit=1280 data.val_size=500 data.loader=torch train.progress=false "
    "distributed.num_workers=1 tracking.system_metrics=false"
)
SWEEP = "sweep.methods=[switch,magnitude-gradual-group] sweep.budgets=[0.5] sweep.seeds=[0]"


def _block() -> str:
    text = (REPO_ROOT / "cluster" / "README.md").read_text()
    [body] = [b for _, b in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M) if MARK in b]
    return body


def _shortened(body: str, port: int, tmp: Path) -> str:
    lines = []
    for line in (
        body.replace("127.0.0.1:5001", f"127.0.0.1:{port}").replace("outputs/team", str(tmp / "team")).splitlines()
    ):
        line = line.replace("uv run ", "")
        if line.startswith("make tracking-server"):
            line = line.replace(
                "make tracking-server",
                f"make -s tracking-server TRACKING_PORT={port} TRACKING_ARTIFACTS={tmp / 'artifacts'}",
                1,
            )
        elif line.startswith("distswitch train"):
            line = f"{line} {SHORT}"
        elif line.startswith("distswitch sweep"):
            line = f"{line} {SHORT} {SWEEP}"
        lines.append(line)
    return "\n".join(lines)


def _stop_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(5)


def test_the_team_setup_in_cluster_readme_runs_as_written(tmp_path):
    port = free_port()
    script = "set -euo pipefail\n" + _shortened(_block(), port, tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the block sets it
    # Files, not pipes: the server the block leaves in the background would hold a pipe open.
    with (tmp_path / "out.txt").open("w") as out, (tmp_path / "err.txt").open("w") as err:
        proc = subprocess.Popen(
            ["bash", "-c", script], cwd=REPO_ROOT, env=env, stdout=out, stderr=err, start_new_session=True
        )
        try:
            proc.wait(timeout=1500)
        finally:
            _stop_group(proc.pid)  # the server the block left running in the background
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert proc.returncode == 0, (stdout + stderr)[-4000:]
    assert "| lenet5 | 50% | switch |" in stdout and "| lenet5 | 50% | magnitude-gradual-group |" in stdout  # the sweep
    assert re.search(r"^\S+\s+lenet5\s+FINISHED\s+switch\s+lenet5", stdout, flags=re.M), stdout[-3000:]  # runs table
    assert stdout.strip().splitlines()[-1], stdout[-2000:]  # the best model, loaded and printed
