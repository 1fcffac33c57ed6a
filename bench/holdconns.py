"""Many TCP connections held open at once, each proven by an echo; and the echo server.

    python -m bench.holdconns serve --port 9090
    python -m bench.holdconns hold --host IP --port 9090 --connections 10000
                                   [--concurrency 200] [--seconds 60]

Both run inside lab pods (``ip netns exec``) and raise their own descriptor limit
to what the count needs. ``hold`` opens the connections with at most
``--concurrency`` connecting at a time, sends each its own token and waits for
that token to come back, then prints one JSON line::

    {"phase": "open", "open": 9998, "failed": 2, "failures": {"refused": 2},
     "first_failure": {"refused": "…"}, "seconds": 7.1}

and holds them until its stdin is closed (whoever started it measures
meanwhile), or ``--seconds`` after its start at the latest. Then it proves every
held connection once more with a second echo (so "held" means alive at the end,
not just opened once), closes them all, and prints ``{"phase": "closed",
"alive": N, "lost": M, …}``. Every wait is bounded; failure kinds are a fixed set.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import resource
import signal
import stat
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import cast

import uvloop

STEP_TIMEOUT = 15.0  # one connect, or one echo (a proxy on a busy 2-core machine queues)
DESCRIPTOR_SLACK = 64  # stdio, the loop's own, the listening socket
MAX_CONNECTIONS = 60_000  # one client address, one server port: the ephemeral range
FAILURE_KINDS = ("refused", "reset", "timeout", "mismatch", "no_descriptors", "other")


def failure_kind(exc: BaseException) -> str:
    """One of FAILURE_KINDS: what a failed connection or echo met."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, EchoMismatch):
        return "mismatch"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionError | EOFError):
        return "reset"
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return "no_descriptors"
    return "other"


class EchoMismatch(Exception):
    """The bytes that came back are not the ones this connection sent."""


def token(index: int, round_: int) -> bytes:
    """What connection ``index`` sends in echo round ``round_``: unique per both."""
    return b"%08d:%d\n" % (index, round_)


class Held(asyncio.Protocol):
    """One client connection; ``echo`` sends a token and waits for exactly it back."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.expected = 0
        self.waiter: asyncio.Future[bytes] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done() and \
                len(self.buffer) >= self.expected:
            answer = bytes(self.buffer[:self.expected])
            del self.buffer[:self.expected]
            self.waiter.set_result(answer)

    def eof_received(self) -> bool:
        self._fail(EOFError("peer closed"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(ConnectionResetError(f"connection lost: {exc}"))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    async def echo(self, payload: bytes) -> None:
        if self.lost or self.transport is None:
            raise ConnectionResetError("connection lost before the echo")
        self.waiter = asyncio.get_running_loop().create_future()
        self.expected = len(payload)
        self.transport.write(payload)
        async with asyncio.timeout(STEP_TIMEOUT):
            answer = await self.waiter
        if answer != payload:
            raise EchoMismatch(f"sent {payload!r}, got {answer!r}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Tally:
    """Failures by kind, with the first message of each kind for the report."""

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def add(self, exc: BaseException) -> None:
        kind = failure_kind(exc)
        self.kinds[kind] += 1
        self.first.setdefault(kind, f"{type(exc).__name__}: {exc}"[:200])

    def report(self) -> dict[str, object]:
        return {"failed": sum(self.kinds.values()), "failures": dict(self.kinds),
                "first_failure": self.first}


async def _in_workers(count: int, concurrency: int,
                      job: Callable[[int], Awaitable[None]]) -> None:
    """Run ``job(i)`` for i in range(count), ``concurrency`` at a time."""
    indices = iter(range(count))

    async def worker() -> None:
        for index in indices:  # shared iterator: each index goes to one worker
            await job(index)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))


async def open_all(host: str, port: int, count: int, concurrency: int, tally: Tally,
                   held: list[tuple[int, Held]]) -> None:
    """Open and prove ``count`` connections into ``held``, which keeps what was opened
    even when the caller's deadline cancels this part-way."""
    loop = asyncio.get_running_loop()

    async def one(index: int) -> None:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                _, conn = await loop.create_connection(Held, host, port)
        except (OSError, TimeoutError) as exc:
            tally.add(exc)
            return
        try:
            await conn.echo(token(index, 1))
        except (OSError, TimeoutError, EOFError, EchoMismatch) as exc:
            tally.add(exc)
            conn.close()
            return
        held.append((index, conn))

    await _in_workers(count, concurrency, one)


async def echo_all(held: Sequence[tuple[int, Held]], tally: Tally) -> int:
    """A second echo on every held connection, all at once (each bounded by
    STEP_TIMEOUT, so the round is too); how many answered."""
    async def one(index: int, conn: Held) -> bool:
        try:
            await conn.echo(token(index, 2))
        except (OSError, TimeoutError, EOFError, EchoMismatch) as exc:
            tally.add(exc)
            return False
        return True

    return sum(await asyncio.gather(*(one(index, conn) for index, conn in held)))


async def stdin_closed() -> None:
    """Returns when our stdin reaches end of file (the starter let go)."""
    mode = os.fstat(0).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        # libuv reads only pipes and sockets (it aborts on /dev/null). A file or
        # /dev/null ends at once; a terminal holds until the deadline.
        if os.isatty(0):
            await asyncio.Event().wait()
        sys.stdin.buffer.read()
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


async def hold(host: str, port: int, count: int, concurrency: int, seconds: float) -> int:
    begin = time.monotonic()
    tally = Tally()
    held: list[tuple[int, Held]] = []
    try:
        async with asyncio.timeout(seconds):
            await open_all(host, port, count, concurrency, tally, held)
    except TimeoutError:
        for _ in range(count - len(held) - sum(tally.kinds.values())):
            tally.add(TimeoutError(f"not opened within --seconds {seconds:g}"))
    emit({"phase": "open", "open": len(held), **tally.report(),
          "seconds": round(time.monotonic() - begin, 2)})
    try:
        async with asyncio.timeout(max(0.0, seconds - (time.monotonic() - begin))):
            await stdin_closed()
    except TimeoutError:
        pass
    second = Tally()
    alive = await echo_all(held, second)
    for _, conn in held:
        conn.close()
    await _until(lambda: all(conn.lost for _, conn in held), STEP_TIMEOUT)
    emit({"phase": "closed", "alive": alive, "lost": len(held) - alive, **second.report(),
          "seconds": round(time.monotonic() - begin, 2)})
    return 0


async def _until(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(port: int) -> int:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "0.0.0.0", port, backlog=4096,
                                      reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    return 0


def raise_descriptor_limit(needed: int) -> None:
    """At least ``needed`` descriptors, raising the hard limit too when allowed (root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def emit(line: dict[str, object]) -> None:
    print(json.dumps(line), flush=True)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.holdconns")
    parser.add_argument("mode", choices=("serve", "hold"))
    parser.add_argument("--host", default="")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(None if argv is None else list(argv))
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        parser.error(f"--connections: {args.connections} is outside 1..{MAX_CONNECTIONS}")
    if not 1 <= args.concurrency <= 10_000 or not 0 < args.seconds <= 3600:
        parser.error("--concurrency must be 1..10000 and --seconds 0..3600")
    if args.mode == "hold" and not args.host:
        parser.error("hold needs --host")
    if args.mode == "serve":
        raise_descriptor_limit(2 * MAX_CONNECTIONS + DESCRIPTOR_SLACK)
        return uvloop.run(serve(args.port))
    raise_descriptor_limit(args.connections + args.concurrency + DESCRIPTOR_SLACK)
    return uvloop.run(hold(args.host, args.port, args.connections, args.concurrency,
                           args.seconds))


if __name__ == "__main__":
    raise SystemExit(main())
