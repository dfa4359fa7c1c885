"""What a run sends to its tracking server goes through an outbox: written to the run's out_dir
first, then shipped by one background thread that retries, so a server that is away blocks no
epoch and loses nothing.

A journal is one JSON line per entry (`<name>.jsonl`) and the count of entries delivered
(`<name>.sent`). `Outbox.put` appends (flushed to disk) and returns at once; the sender delivers the
entries in order through `deliver(entry)`, which must tolerate an entry delivered twice (a process
killed between a delivery and its mark repeats it). While deliveries fail the sender prints one
warning line and tries again (1 s doubling to 30 s); once through, one line says what it sent.
What is unsent when a process ends stays in the folder: the next sender there, or `send_all` (the
`distswitch sync` command), ships it. A lock per journal keeps two senders from delivering the same
entries; a journal whose lock is held is its live sender's to ship.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from distswitch.io import atomic_path

Deliver = Callable[[dict], None]


class Journal:
    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = Path(folder), name
        self.path, self.mark = self.folder / f"{name}.jsonl", self.folder / f"{name}.sent"

    def append(self, entry: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def entries(self) -> list[dict]:
        """Every complete entry; a line cut short by a killed writer ends the journal (`repair` drops it)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            out.append(json.loads(line))
        return out

    def repair(self) -> None:
        """Drop a last line a killed writer left without its end, so the next entry starts a line."""
        if self.path.is_file():
            text = self.path.read_text()
            if text and not text.endswith("\n"):
                self.path.write_text(text[: text.rfind("\n") + 1])

    def sent(self) -> int:
        return int(self.mark.read_text()) if self.mark.is_file() else 0

    def mark_sent(self, count: int) -> None:
        with atomic_path(self.mark) as tmp:
            tmp.write_text(str(count))

    @contextmanager
    def locked(self, wait: bool = True):
        """The journal's delivery lock; yields False (without it) when another process holds it and
        `wait` is off."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"{self.name}.lock").open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def journals(folder: Path) -> list[Journal]:
    return [Journal(folder, p.stem) for p in sorted(Path(folder).glob("*.jsonl"))]


def deliver_pending(journal: Journal, deliver: Deliver, wait: bool = True) -> int | None:
    """Deliver the journal's unsent entries in order, marking each; the count delivered, None when
    another sender holds it. A failed delivery raises, with the ones before it marked."""
    with journal.locked(wait) as held:
        if not held:
            return None
        entries, done = journal.entries(), journal.sent()
        start = done
        while done < len(entries):
            deliver(entries[done])
            done += 1
            journal.mark_sent(done)
        return done - start


def unsent(folder: Path) -> int:
    return sum(max(len(j.entries()) - j.sent(), 0) for j in journals(folder))


def send_all(folder: Path, deliver: Deliver) -> tuple[int, list[str]]:
    """Every journal in the folder delivered now (`distswitch sync`): (entries sent, journals left
    to the live sender that holds them)."""
    sent, busy = 0, []
    for journal in journals(folder):
        count = deliver_pending(journal, deliver, wait=False)
        if count is None:
            busy.append(journal.name)
        else:
            sent += count
    return sent, busy


class Outbox:
    """One journal and its sender thread (a daemon: a process that ends leaves the unsent on disk).
    The sender also ships what other journals in the folder hold unsent when no live sender holds
    them (a killed worker's), before its own."""

    def __init__(
        self,
        folder: Path,
        name: str,
        deliver: Deliver,
        where: str,
        transient: Callable[[BaseException], bool] = lambda exc: True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.journal, self.deliver, self.where, self.transient = Journal(folder, name), deliver, where, transient
        self.error: BaseException | None = None  # a delivery error no retry cures: the sender stopped on it
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        with self.journal.locked():
            self.journal.repair()
        self._changed = threading.Condition()
        self._queued = len(self.journal.entries())
        self._sent = self.journal.sent()
        self._last_error: str | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"distswitch-outbox-{name}", daemon=True)
        self._thread.start()

    def put(self, entry: dict) -> None:
        with self._changed:
            self.journal.append(entry)
            self._queued += 1
            self._changed.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for everything put to be delivered; whether it was (not when
        the sender stopped on an error no retry cures: `error`)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._sent < self._queued and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return self._sent >= self._queued

    def close(self) -> None:
        """Stop the sender (what is unsent stays in the journal)."""
        self._closed.set()
        with self._changed:
            self._changed.notify_all()

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def _run(self) -> None:
        # What a killed peer left is in the folder before this sender starts: one sweep, then only
        # its own journal (no idle polling of the folder during training).
        delay, failing, peers = 1.0, False, True
        while not self._closed.is_set():
            with self._changed:
                if self._sent >= self._queued and not failing and not peers:
                    self._changed.wait()  # woken by `put` or `close`
            try:
                if peers:
                    for other in journals(self.journal.folder):
                        if other.name != self.journal.name:
                            deliver_pending(other, self.deliver, wait=False)
                    peers = False
                deliver_pending(self.journal, self.deliver)
            except Exception as exc:
                if not self.transient(exc):  # a bug or a refusal: retrying would only hide it
                    with self._changed:
                        self.error = exc
                        self._changed.notify_all()
                    return
                self._last_error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                if not failing:
                    self.log(
                        f"distswitch: warning: MLflow at {self.where} is not taking what the run logs "
                        f"({self._last_error}); training goes on, and what it logs waits in "
                        f"{self.journal.folder} until the server is back"
                    )
                failing = True
                self._closed.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            finally:
                with self._changed:
                    self._sent = self.journal.sent()
                    self._changed.notify_all()
            if failing:
                self.log(f"distswitch: MLflow at {self.where} is back; what waited in {self.journal.folder} is sent")
            failing, delay, self._last_error = False, 1.0, None
