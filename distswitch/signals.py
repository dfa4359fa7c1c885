"""How a stop signal ends a run: SIGTERM and SIGINT both raise the KeyboardInterrupt Ctrl-C raises,
and the signal is remembered so the driver's messages and MLflow's tag can name it."""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """The driver's handler of both stop signals: the run ends as Ctrl-C ends it (a KeyboardInterrupt
    in the main thread). It remembers the signal, since ray.get re-raises a KeyboardInterrupt of its own."""

    received: int | None = None
    held: bool = False

    def __call__(self, signum, frame):
        self.received = signum
        if not self.held:
            raise KeyboardInterrupt(signal.Signals(signum).name)


def install() -> None:
    """Make SIGTERM and SIGINT end this process's run the same way (main thread only, as Python requires)."""
    handler = StopSignal()
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


@contextlib.contextmanager
def held():
    """A stop signal that arrives inside the block is acted on at its end, so that what the block
    starts (a local cluster) is there whole to be stopped. A no-op where `install` was not called."""
    handler = signal.getsignal(signal.SIGTERM)
    if not isinstance(handler, StopSignal):
        yield
        return
    before, handler.held = handler.received, True
    try:
        yield
    finally:
        handler.held = False
    if handler.received is not None and before is None:
        raise KeyboardInterrupt(signal.Signals(handler.received).name)


def stop_signal() -> signal.Signals:
    """The signal that stopped this process: the one the driver's handler saw, else SIGINT (a
    KeyboardInterrupt raised without a signal)."""
    return signal.Signals(getattr(signal.getsignal(signal.SIGTERM), "received", None) or signal.SIGINT)
