"""How a stop signal ends a run: SIGTERM is turned into the KeyboardInterrupt Ctrl-C raises, and the
signal is remembered so the driver's messages and MLflow's tag can name it."""

from __future__ import annotations

import signal


class StopSignal:
    """SIGTERM's handler in the driver: the run ends as Ctrl-C ends it (a KeyboardInterrupt in the
    main thread). It remembers the signal, since ray.get re-raises a KeyboardInterrupt of its own."""

    received: int | None = None

    def __call__(self, signum, frame):
        self.received = signum
        raise KeyboardInterrupt(signal.Signals(signum).name)


def install() -> None:
    """Make SIGTERM end this process's run as Ctrl-C does (main thread only, as Python requires)."""
    signal.signal(signal.SIGTERM, StopSignal())


def stop_signal() -> signal.Signals:
    """The signal that stopped this process: SIGTERM if the driver's handler saw one, else SIGINT."""
    return signal.Signals(getattr(signal.getsignal(signal.SIGTERM), "received", None) or signal.SIGINT)
