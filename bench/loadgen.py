"""The benchmark's HTTP load generator; runs inside the client pod, prints one JSON line.

    python -m bench.loadgen rr   --host H --port P --rate 1000 --seconds 5 [--connections 10]
    python -m bench.loadgen crr  --host H --port P --seconds 3 [--concurrency 4]
    python -m bench.loadgen hold --host H --port P --connections 1000 [--seconds 60]

``rr`` is open-loop: request k is *scheduled* at start + k/rate, spread round-robin
over persistent connections, and its latency counts from the scheduled time, so
a stalled proxy shows as latency rather than as a lower offered rate
(coordinated omission, as wrk2 corrects it). ``crr`` is closed-loop, one new
connection per request. ``hold`` opens N connections, proves each with one
request, prints ``{"open": N}``, and holds them until stdin closes (the bench
reads the proxies' RSS meanwhile). Every mode is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Sequence
from typing import cast

import uvloop

from bench.stats import percentile

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
REQUEST_CLOSE = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
# uvloop's loop.time() has millisecond resolution; latencies need microseconds.
clock = time.perf_counter
GRACE_SECONDS = 5.0  # past the planned end, unanswered requests count as errors


def scheduled_offset(k: int, rate: float) -> float:
    """Seconds after the start at which request ``k`` is due (open-loop schedule)."""
    return k / rate


def latency_start(due: float, sent: float, free_at: float) -> float:
    """Where a request's latency starts counting.

    From ``due`` when the connection was still busy with the previous response
    at that time: the whole wait is the system's doing (coordinated omission).
    From ``sent`` otherwise: the gap between due and sent is then only our own
    timer's resolution (about 1 ms in uvloop), which is not the proxy's cost.
    """
    return due if free_at > due else sent


def latency_summary(latencies: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99 in µs: a few numbers on stdout, not tens of thousands of samples."""
    return {f"p{q}_us": (round(percentile(latencies, q) * 1e6, 1) if latencies else None)
            for q in (50, 90, 99)}


def response_length(buffer: bytes) -> int | None:
    """Bytes of the first complete response in ``buffer`` (Content-Length framed), or None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    length = 0
    for line in buffer[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    total = end + 4 + length
    return total if len(buffer) >= total else None


class Client(asyncio.Protocol):
    """One connection; ``request()`` returns when the whole response is in."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        size = response_length(self.buffer)
        if size is not None and self.waiter is not None and not self.waiter.done():
            self.buffer = self.buffer[size:]
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed before the response"))
        if not self.closed.done():
            self.closed.set_result(None)

    async def request(self, payload: bytes = REQUEST) -> None:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        await self.waiter


async def connect(host: str, port: int) -> Client:
    _, client = await asyncio.get_running_loop().create_connection(Client, host, port)
    return client


async def run_rr(host: str, port: int, rate: float, seconds: float,
                 connections: int) -> dict[str, object]:
    clients = [await connect(host, port) for _ in range(connections)]
    for c in clients:  # warm every path (pools, handshakes) before the clock starts
        await c.request()
    total = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    start = clock() + 0.05
    done_at = start

    async def drive(index: int, client: Client) -> None:
        nonlocal errors, done_at
        free_at = start  # when this connection's previous response was complete
        for k in range(index, total, connections):
            due = start + scheduled_offset(k, rate)
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = clock()
            try:
                await client.request()
            except ConnectionError:
                errors += 1
                return
            now = clock()
            latencies.append(now - latency_start(due, sent, free_at))
            free_at = now
            done_at = max(done_at, now)

    # One deadline for the whole run: a timeout per request would cost a task each.
    try:
        await asyncio.wait_for(asyncio.gather(*(drive(i, c) for i, c in enumerate(clients))),
                               seconds + GRACE_SECONDS)
    except TimeoutError:
        pass
    errors += total - len(latencies) - errors  # every request never answered
    for c in clients:
        assert c.transport is not None
        c.transport.close()
    elapsed = max(done_at - start, 1e-9)
    return {"mode": "rr", "offered_rps": rate, "requests": total, "completed": len(latencies),
            "errors": errors, "seconds": elapsed, "rate": len(latencies) / elapsed,
            **latency_summary(latencies)}


async def run_crr(host: str, port: int, seconds: float, concurrency: int,
                  max_count: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0
    start = loop.time()
    end = start + seconds

    async def worker() -> None:
        nonlocal errors
        while loop.time() < end and len(latencies) + errors < max_count:
            t0 = clock()
            try:
                client = await asyncio.wait_for(connect(host, port), GRACE_SECONDS)
                await asyncio.wait_for(client.request(REQUEST_CLOSE), GRACE_SECONDS)
                assert client.transport is not None
                client.transport.close()
            except (OSError, TimeoutError):
                errors += 1
                continue
            latencies.append(clock() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = max(loop.time() - start, 1e-9)  # every connect refused at once: no 0 division
    return {"mode": "crr", "completed": len(latencies), "errors": errors, "seconds": elapsed,
            "rate": len(latencies) / elapsed, **latency_summary(latencies)}


async def run_hold(host: str, port: int, connections: int, seconds: float) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    batch = 50  # connect in small batches: a burst of 1,000 SYNs would overflow backlogs
    clients: list[Client] = []
    errors = 0
    for first in range(0, connections, batch):
        tries = [connect(host, port) for _ in range(min(batch, connections - first))]
        for result in await asyncio.gather(*tries, return_exceptions=True):
            if isinstance(result, Client):
                clients.append(result)
            else:
                errors += 1
    answers = await asyncio.gather(*(asyncio.wait_for(c.request(), GRACE_SECONDS)
                                     for c in clients), return_exceptions=True)
    open_count = sum(1 for a in answers if a is None)
    print(json.dumps({"open": open_count, "errors": errors + len(answers) - open_count}),
          flush=True)
    # Hold until the bench closes our stdin (it has read the RSS), or the deadline.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        await asyncio.wait_for(reader.read(), seconds)
    except TimeoutError:
        pass
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    return {"mode": "hold", "open": open_count}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("mode", choices=("rr", "crr", "hold"))
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-count", type=int, default=100_000)
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.mode == "rr":
        coro = run_rr(args.host, args.port, args.rate, args.seconds, args.connections)
    elif args.mode == "crr":
        coro = run_crr(args.host, args.port, args.seconds, args.concurrency, args.max_count)
    else:
        coro = run_hold(args.host, args.port, args.connections, args.seconds)
    print(json.dumps(uvloop.run(coro)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
