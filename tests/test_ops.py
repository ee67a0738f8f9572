"""ops.accept_forever, the accept loop of every listening socket of both
daemons: it never dies and never spins; ops.print_line, the line a script
waits for on a daemon's stdout."""

from __future__ import annotations

import errno
import io
import logging
import socket
import sys
import threading

import pytest

import ops
from hubtools import wait_until


class Flaky:
    """A listening socket whose accept fails with ``errors`` first."""

    def __init__(self, sock: socket.socket, errors: list[int]):
        self.sock, self.errors = sock, list(errors)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self):
        if self.errors:
            raise OSError(self.errors.pop(0), "injected")
        return self.sock.accept()


class Stop(threading.Event):
    """A stop flag that records every wait of the loop (its backoff)."""

    def __init__(self):
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout=None) -> bool:
        self.waits.append(timeout)
        return self.is_set()


def run_loop(listener, start_one, caplog):
    stop = Stop()
    throttle = ops.LogThrottle(logging.getLogger("test-ops"))
    t = threading.Thread(target=ops.accept_forever,
                         args=(listener, stop, start_one, throttle, "client", "a hint"),
                         daemon=True)
    t.start()
    return stop, t


def test_out_of_descriptors_backs_off_doubling_then_serves_and_logs_once(tmp_path, caplog):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "s"))
    server.listen(4)
    served = []
    listener = Flaky(server, [errno.EMFILE] * 5 + [errno.ECONNABORTED])
    with caplog.at_level(logging.DEBUG, "test-ops"):
        stop, t = run_loop(listener, lambda c, a: served.append(c) or True, caplog)
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(tmp_path / "s"))    # keeps the listener readable
        try:
            wait_until(lambda: served, 10, "the client served after the errors")
        finally:
            stop.set()
            t.join(5)
            client.close()
            server.close()
            for c in served:
                c.close()
    assert not t.is_alive()
    assert stop.waits[:5] == [0.05, 0.1, 0.2, 0.4, 0.8], stop.waits
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "accept failed" in warnings[0].getMessage()
    assert "a hint" in warnings[0].getMessage()


def test_a_client_that_cannot_be_started_is_closed_and_the_loop_goes_on(tmp_path, caplog):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "s"))
    server.listen(4)
    calls, closed = [], []

    def start_one(client, _):
        calls.append(client)
        if len(calls) == 1:
            raise RuntimeError("can't start new thread")
        if len(calls) == 2:
            raise ValueError("a bug in one client's set-up")
        return True
    with caplog.at_level(logging.WARNING, "test-ops"):
        stop, t = run_loop(server, start_one, caplog)
        clients = []
        try:
            for _ in range(3):
                c = socket.socket(socket.AF_UNIX)
                c.connect(str(tmp_path / "s"))
                clients.append(c)
            wait_until(lambda: len(calls) == 3, 10, "three clients handed over")
            for c in clients[:2]:   # the loop closed the two it could not take
                c.settimeout(5)
                closed.append(c.recv(1) == b"")
        finally:
            stop.set()
            t.join(5)
            server.close()
            for c in clients + calls:
                c.close()
    assert closed == [True, True]
    assert any("cannot start its thread" in r.getMessage() for r in caplog.records)
    assert any("a bug in one client" in r.getMessage() for r in caplog.records)
    assert not t.is_alive()


class WriteLog(io.RawIOBase):
    """A raw file that keeps each write(2) it is asked for."""

    def __init__(self):
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.writes.append(bytes(b))
        return len(b)


@pytest.mark.parametrize("unbuffered", [True, False])
def test_print_line_writes_the_line_and_its_newline_at_once(monkeypatch, unbuffered):
    """The tests (and an operator's script) wait for the hub's "listening" line
    in a file its log threads write to: a log line between the text and its
    newline hid it once, as ``print`` writes them apart to an unbuffered stdout
    (``PYTHONUNBUFFERED``, as the test runs have it)."""
    raw = WriteLog()
    stdout = (io.TextIOWrapper(raw, write_through=True) if unbuffered
              else io.TextIOWrapper(io.BufferedWriter(raw)))
    monkeypatch.setattr(sys, "stdout", stdout)
    ops.print_line("rephub listening on 127.0.0.1:10809")
    assert raw.writes == [b"rephub listening on 127.0.0.1:10809\n"]
