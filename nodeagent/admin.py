"""The agent's plain-HTTP endpoints: Prometheus metrics (15020) and readiness (15021).

Small enough to serve by hand: one GET per connection, no keep-alive, no body.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tunnel.config import ConfigError

MAX_REQUEST_HEAD = 8192


def _response(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def _read_path(reader: asyncio.StreamReader) -> str | None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) != 3 or parts[0] != b"GET":
        return None
    return parts[1].decode("latin-1").split("?", 1)[0]


class AdminServer:
    def __init__(self, registry: CollectorRegistry, ready: Callable[[], str | None]) -> None:
        """``ready()`` returns None when ready, else why not (shown on 503)."""
        self._registry = registry
        self._ready = ready
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self, metrics: tuple[str, int], readiness: tuple[str, int]) -> None:
        """Bind both endpoints; a busy address raises ConfigError naming the setting."""
        for setting, address in (("--metrics", metrics), ("--readiness", readiness)):
            try:
                server = await asyncio.start_server(
                    self._serve, address[0], address[1], limit=MAX_REQUEST_HEAD)
            except OSError as exc:
                self.close()
                why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise ConfigError(f"{setting} {address[0]}:{address[1]}: {why}") from exc
            self._servers.append(server)

    def close(self) -> None:
        for server in self._servers:
            server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = await _read_path(reader)
        if path == "/metrics":
            reply = _response("200 OK", generate_latest(self._registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz/ready":
            why_not = self._ready()
            reply = (_response("200 OK", b"ready\n") if why_not is None
                     else _response("503 Service Unavailable", why_not.encode() + b"\n"))
        elif path is None:
            reply = _response("400 Bad Request", b"bad request\n")
        else:
            reply = _response("404 Not Found", b"not found\n")
        writer.write(reply)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
