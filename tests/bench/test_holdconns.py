"""The soak's holder and echo server on loopback: what they count is what happened."""

from __future__ import annotations

import errno
import json
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from bench.holdconns import EchoMismatch, failure_kind, token

HOLD = [sys.executable, "-m", "bench.holdconns"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hold(port: int, connections: int) -> list[dict]:
    """Run a holder whose stdin is already closed: open, prove, let go at once."""
    done = subprocess.run([*HOLD, "hold", "--host", "127.0.0.1", "--port", str(port),
                           "--connections", str(connections), "--concurrency", "8",
                           "--seconds", "20"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.unit
def test_failure_kinds_are_a_fixed_set() -> None:
    assert failure_kind(TimeoutError()) == "timeout"
    assert failure_kind(ConnectionRefusedError()) == "refused"
    assert failure_kind(ConnectionResetError()) == "reset"
    assert failure_kind(EOFError()) == "reset"
    assert failure_kind(EchoMismatch()) == "mismatch"
    assert failure_kind(OSError(errno.EMFILE, "too many")) == "no_descriptors"
    assert failure_kind(OSError(errno.EHOSTUNREACH, "no route")) == "other"
    assert token(7, 1) != token(7, 2) != token(8, 2)


@pytest.fixture
def echo_port() -> Iterator[int]:
    port = _free_port()
    server = subprocess.Popen([*HOLD, "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:  # polled: the server announces nothing when it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None, server.communicate()[1]
                assert time.monotonic() < deadline, "echo server did not listen"
                time.sleep(0.05)
        yield port
    finally:
        server.terminate()
        server.communicate(timeout=10)


@pytest.mark.inprocess
def test_every_connection_is_proven_twice_by_its_echo(echo_port: int) -> None:
    opened, closed = _hold(echo_port, 50)
    assert (opened["phase"], opened["open"], opened["failed"]) == ("open", 50, 0)
    assert (closed["phase"], closed["alive"], closed["lost"]) == ("closed", 50, 0)


class _WrongEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(64):
            self.request.sendall(data[::-1])  # same length, wrong bytes


@pytest.mark.inprocess
def test_wrong_bytes_back_and_nobody_listening_are_failures() -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _WrongEcho)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        opened, closed = _hold(server.server_address[1], 5)
    finally:
        server.shutdown()
        server.server_close()
    assert (opened["open"], opened["failed"], opened["failures"]) == (0, 5, {"mismatch": 5})
    assert closed["alive"] == 0
    refused, _ = _hold(_free_port(), 3)
    assert (refused["open"], refused["failures"]) == (0, {"refused": 3})
