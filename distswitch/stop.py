"""Why a run stopped for good, in one place: the errors no restart cures, the record a stopped
worker leaves as the run's latest checkpoint (stopped.json) and reads back across the Ray
boundary, how the driver raises it again, and the line and exit status a user gets.

A run's life: the worker raises a stop (TrainingStopped from the engine, or an incurable error);
`worker.train.train` catches it once and reports it as a checkpoint (`Stop.write`); `ray_main`
returns normally, so Ray Train does not retry into the same stop; the driver reads the record from
the final checkpoint (`Stop.read`) and raises it again (`Stop.exception`); the CLI turns it, like a
run Ray gave up on (`RunFailed`) or a stop signal, into one line and an exit status (`for_user`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distswitch.config import ConfigError
from distswitch.data.datasets import DataError
from distswitch.io import write_json
from distswitch.manifest import CheckpointDamaged
from distswitch.registry import UnknownNameError

FILE, METRIC = "stopped.json", "stopped"  # in the stop's checkpoint folder; its report's metric


class TrainingStopped(RuntimeError):
    """Training cannot go on (it diverged, a layer fell below switcher.min_kept): stopped for good;
    the same command resumes from the last good epoch once the cause is fixed."""


class RunFailed(RuntimeError):
    """Ray Train gave up on the workers (failures beyond distributed.max_failures); the message says
    which worker failed and which checkpoint a rerun would resume."""


# Errors no restart cures: a user's config, names, data or a damaged checkpoint.
INCURABLE = (ConfigError, UnknownNameError, DataError, CheckpointDamaged)
STOPS = (TrainingStopped, *INCURABLE)  # what a worker reports as a stop for good


@dataclass(frozen=True)
class Stop:
    message: str
    error: str | None = None  # an incurable error's class name; None: TrainingStopped

    @classmethod
    def of(cls, exc: BaseException) -> Stop:
        return cls(str(exc), type(exc).__name__ if isinstance(exc, INCURABLE) else None)

    def write(self, folder: Path) -> None:
        write_json(Path(folder) / FILE, {"message": self.message, "error": self.error})

    @classmethod
    def read(cls, folder: Path) -> Stop | None:
        path = Path(folder) / FILE
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        return cls(record["message"], record.get("error"))

    def exception(self, kept: str) -> Exception:
        """The stop as the driver raises it: the incurable error itself, or TrainingStopped naming
        where the last good epoch is `kept`."""
        incurable = {cls.__name__: cls for cls in INCURABLE}
        if self.error in incurable:
            return incurable[self.error](self.message)
        return TrainingStopped(f"{self.message} (kept in {kept}; the same command resumes from it)")


def for_user(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, the one line) for an error that ends a command as designed; None for a bug
    (its traceback is the report)."""
    if isinstance(exc, INCURABLE):
        return 2, f"distswitch: error: {exc}"
    if isinstance(exc, TrainingStopped):
        return 1, f"distswitch: stopped: {exc}"
    if isinstance(exc, RunFailed):
        return 1, f"distswitch: failed: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        from distswitch import signals

        signum = signals.stop_signal()
        return 128 + signum, (
            f"distswitch: stopped by {signum.name}; run the same command again to continue "
            "from the last epoch checkpoint"
        )
    return None
