"""The benchmark's HTTP server: answers every request with a 1 KiB body.

    python -m bench.httpd --port 8090

Same server behind every scenario, so differences are the proxies'. A raw
``asyncio.Protocol`` on uvloop keeps it far cheaper than the proxies it sits
behind; keep-alive unless the request says ``Connection: close``. It serves
only the benchmark's GETs; anything after the header block is ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
from collections.abc import Sequence
from typing import cast

import uvloop

BODY = b"x" * 1024
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY
END = b"\r\n\r\n"
MAX_HEADER = 16 * 1024


class HttpServer(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while (end := self.buffer.find(END)) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + len(END):]
            self.transport.write(RESPONSE)
            if b"connection: close" in head.lower():
                self.transport.close()
                return
        if len(self.buffer) > MAX_HEADER:
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HttpServer, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.httpd")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # 1,000 held connections need more descriptors than the usual soft limit of 1024.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
