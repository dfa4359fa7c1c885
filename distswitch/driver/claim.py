"""One driver per run: an exclusive claim on the run's out_dir for the driver's whole life.

The claim is an advisory lock (`flock`) on `<out_dir>/.distswitch.lock`, which also names its holder
(host, pid, since). The kernel drops the lock when the holding process dies, however it dies (on
NFSv4 the server does, when the dead client's lease runs out), so a crashed driver's claim is taken
over without a stale-file guess; the holder it names is then said in one line. A driver that ends
normally empties the file, so the next launch has nothing to report.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from distswitch.config import ConfigError

LOCK_FILE = ".distswitch.lock"


def _holder(text: str) -> str:
    try:
        who = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who["since"]))
        return f"host {who['host']}, pid {who['pid']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "a driver that left no name"


@contextmanager
def claim(out_dir: str | Path, what: str = "run"):
    """Hold out_dir for the block; a second claimant is refused with a ConfigError naming the holder."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held = path.read_text(errors="replace")
        os.close(fd)
        raise ConfigError(
            f"out_dir: {str(folder)!r} is in use by another distswitch {what} ({_holder(held)}); "
            "wait for it to end or stop it (the same command then resumes), "
            "or pass another out_dir=... for a new run"
        ) from None
    try:
        left = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if left:  # the previous holder died without emptying the file
            print(
                f"distswitch: taking over out_dir {str(folder)!r} from a driver that is gone ({_holder(left)})",
                file=sys.stderr,
            )
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        os.fsync(fd)
        yield
    finally:
        os.ftruncate(fd, 0)  # ended normally (or by a signal it handled): nothing to take over
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
