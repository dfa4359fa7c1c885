"""The outbox: what a run logs is on disk before it is sent, sent in order once, and never waited for."""

from __future__ import annotations

import json
import threading
import time

from distswitch.outbox import Journal, Outbox, send_all, unsent


class Server:
    """Takes entries while up; refuses with a connection error while down (as a stopped server)."""

    def __init__(self) -> None:
        self.up, self.got, self.calls = True, [], 0

    def __call__(self, entry: dict) -> None:
        self.calls += 1
        if not self.up:
            raise ConnectionRefusedError("connection refused")
        self.got.append(entry["n"])


def test_entries_put_while_the_server_is_down_return_at_once_and_arrive_in_order_once_it_is_back(tmp_path):
    server, lines = Server(), []
    server.up = False
    box = Outbox(tmp_path, "rank0", server, "http://server", log=lines.append)
    start = time.monotonic()
    for n in range(5):
        box.put({"n": n})
    assert time.monotonic() - start < 0.5  # nothing waits for the server
    assert not box.flush(timeout=1.5) and server.got == [] and server.calls >= 1
    assert [e["n"] for e in Journal(tmp_path, "rank0").entries()] == [0, 1, 2, 3, 4]  # on disk meanwhile
    server.up = True
    assert box.flush(timeout=40)
    box.close()
    assert server.got == [0, 1, 2, 3, 4] and unsent(tmp_path) == 0
    assert len(lines) == 2 and "warning" in lines[0] and str(tmp_path) in lines[0] and "is back" in lines[1]


def test_what_a_killed_process_left_unsent_is_sent_by_the_next_sender_in_the_folder(tmp_path):
    left = Journal(tmp_path, "rank0")
    for n in range(3):
        left.append({"n": n})
    left.mark_sent(1)  # entry 0 went out before the kill
    with (tmp_path / "rank0.jsonl").open("a") as f:
        f.write('{"n": 3, "cut')  # a line the kill cut short
    server = Server()
    box = Outbox(tmp_path, "driver", server, "http://server", log=lambda line: None)
    box.put({"n": 10})
    assert box.flush(timeout=20)
    deadline = time.monotonic() + 20
    while unsent(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    box.close()
    assert sorted(server.got) == [1, 2, 10] and unsent(tmp_path) == 0


def test_a_journal_cut_mid_line_takes_new_entries_on_a_line_of_their_own(tmp_path):
    (tmp_path / "rank0.jsonl").write_text('{"n": 0}\n{"n": 1, "cu')
    server = Server()
    box = Outbox(tmp_path, "rank0", server, "http://server", log=lambda line: None)
    box.put({"n": 2})
    assert box.flush(timeout=20)
    box.close()
    assert server.got == [0, 2]
    assert [json.loads(line)["n"] for line in (tmp_path / "rank0.jsonl").read_text().splitlines()] == [0, 2]


def test_an_error_no_retry_cures_stops_the_sender_and_is_handed_to_the_waiter(tmp_path):
    def refuse(entry: dict) -> None:
        raise ValueError("INVALID_PARAMETER_VALUE: bad metric")

    box = Outbox(
        tmp_path,
        "driver",
        refuse,
        "http://server",
        transient=lambda exc: isinstance(exc, OSError),
        log=lambda line: None,
    )
    box.put({"n": 0})
    start = time.monotonic()
    assert not box.flush(timeout=30)
    assert time.monotonic() - start < 10 and isinstance(box.error, ValueError)
    assert unsent(tmp_path) == 1  # kept for a later `distswitch sync`


def test_sync_sends_every_journal_but_one_a_live_sender_holds(tmp_path):
    for name in ("driver", "rank0"):
        journal = Journal(tmp_path, name)
        journal.append({"n": name})
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with Journal(tmp_path, "rank0").locked():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    server = Server()
    try:
        assert send_all(tmp_path, server) == (1, ["rank0"])
    finally:
        release.set()
        holder.join()
    assert server.got == ["driver"]
    assert send_all(tmp_path, server) == (1, []) and server.got == ["driver", "rank0"]
    assert send_all(tmp_path, server) == (0, [])  # nothing twice
