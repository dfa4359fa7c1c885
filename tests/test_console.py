"""What a person sees running `distswitch train` in a real terminal (tmux): the epoch lines and the
summary on stdout, one live progress bar on the terminal, and none of Ray Train's reporting or
checkpoint chatter."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import DEFAULT_CONFIG, REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _tmux():
    assert shutil.which("tmux"), "tmux is missing: `make setup` installs it"


BIN = Path(sys.executable).parent
EPOCHS = 3
BAR = re.compile(r"epoch (\d+)/\d+.*\d+%\|")  # tqdm's "desc: 40%|████  | 8/20 [...]"
CHATTER = ("TrainingReport(", "Checkpoint successfully", "Reporting training result")


def _pane(socket: str) -> list[str]:
    shown = subprocess.run(["tmux", "-L", socket, "capture-pane", "-p", "-t", "run"], capture_output=True, text=True)
    return shown.stdout.splitlines()


def test_a_terminal_run_shows_epoch_lines_one_live_bar_and_the_summary_without_ray_chatter(tmp_path, fashion_betons):
    out, stdout, done = tmp_path / "run", tmp_path / "stdout.txt", tmp_path / "status"
    command = " ".join(
        shlex.quote(a)
        for a in [
            str(BIN / "distswitch"),
            "train",
            str(DEFAULT_CONFIG),
            f"train.epochs={EPOCHS}",
            "data.train_limit=4000",
            "train.device=cpu",
            f"out_dir={out}",
        ]
    )
    socket = f"distswitch-{uuid.uuid4().hex[:8]}"
    # stdout to a file (what a log keeps); stderr stays on the terminal, where the bar draws.
    script = f"cd {shlex.quote(str(REPO_ROOT))} && {command} > {shlex.quote(str(stdout))}; echo $? > {shlex.quote(str(done))}"
    subprocess.run(
        [
            "tmux",
            "-L",
            socket,
            "new-session",
            "-d",
            "-s",
            "run",
            "-x",
            "160",
            "-y",
            "60",
            "bash",
            "-c",
            script + "; sleep 600",
        ],
        check=True,
    )
    snapshots = []
    try:
        deadline = time.time() + 400
        while not done.is_file():
            assert time.time() < deadline, "\n".join(_pane(socket))
            snapshots.append(_pane(socket))
            time.sleep(0.5)
        final = _pane(socket)
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
    assert done.read_text().strip() == "0", "\n".join(final)
    lines = [line for line in stdout.read_text().splitlines() if line.strip()]
    terminal = "\n".join(final)
    for noise in CHATTER:
        assert not any(noise in line for line in lines), lines
        assert noise not in terminal, terminal
    # One line per epoch and the two summary lines, a few lines besides.
    assert sum("test acc" in line for line in lines) == 1 and len(lines) <= EPOCHS + 5, lines
    # The bar was drawn, and an epoch's bar at no moment as more than one line (Ray's log prefixing
    # once split it into fragments).
    seen = [[m.group(1) for m in map(BAR.search, shot) if m] for shot in snapshots]
    assert any(seen), "no progress bar seen on the terminal"
    for shot, epochs in zip(snapshots, seen):
        assert len(epochs) == len(set(epochs)), "\n".join(shot)
