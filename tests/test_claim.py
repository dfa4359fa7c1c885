"""One driver per run: the claim on out_dir refuses a second holder, naming the first, and is taken
over, in one line, from a driver that died holding it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from distswitch.config import ConfigError
from distswitch.driver.claim import LOCK_FILE, claim


def test_a_second_claim_on_a_held_out_dir_is_refused_naming_the_holder(tmp_path):
    with claim(tmp_path):
        with pytest.raises(
            ConfigError, match=rf"in use by another distswitch run \(host \S+, pid {os.getpid()}, since "
        ):
            with claim(tmp_path):
                pass
    with claim(tmp_path):  # released when the first ended
        pass


def test_a_claim_left_by_a_killed_driver_is_taken_over_in_one_line(tmp_path, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from distswitch.driver.claim import claim\n"
                f"with claim({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        with claim(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    capsys.readouterr()
    with claim(tmp_path):
        said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "taking over" in said[0] and f"pid {holder.pid}" in said[0]


def test_a_claim_ended_normally_leaves_nothing_to_take_over(tmp_path, capsys):
    with claim(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text()
    assert (tmp_path / LOCK_FILE).read_text() == ""
    with claim(tmp_path):
        time.sleep(0)
    assert capsys.readouterr().err == ""
