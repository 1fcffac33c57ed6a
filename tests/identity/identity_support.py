"""Shared values for the identity tests: a fixed clock, two identities, a fake registry.

Imported as a top-level module (pytest puts this directory on sys.path); the
name is prefixed so it cannot collide with another test directory's helpers.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

from identity.ca import CertificateAuthority
from identity.ca_server import CaServer
from identity.http1 import Response, parse_response, render_request
from identity.spiffe import Identity

# Whole seconds: X.509 times have second precision, so comparisons stay exact.
NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
BACKEND = Identity.of("demo", "backend")
FRONTEND = Identity.of("demo", "frontend")


@dataclass(frozen=True)
class StaticRegistry:
    """`WorkloadRegistry` from a fixed set of (node, identity) placements."""

    placements: frozenset[tuple[str, Identity]]

    def runs_on(self, node: str, identity: Identity) -> bool:
        return (node, identity) in self.placements


async def raw(server: CaServer, ca: CertificateAuthority, method: str, target: str,
              body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """One request with hand-made headers and body, over TLS verified against the root."""
    context = ssl.create_default_context(cadata=ca.root_pem.decode())
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.port, ssl=context, server_hostname="trellis-ca")
    writer.write(render_request(method, target, host="trellis-ca", body=body, headers=headers))
    await writer.drain()
    data = await reader.read()
    writer.close()
    return parse_response(data)


async def scrape(server: CaServer) -> str:
    """The monitoring listener's /metrics, in plain HTTP as Prometheus reads it."""
    assert server.metrics_url is not None
    host, port = server.metrics_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(render_request("GET", "/metrics", host=host))
    await writer.drain()
    data = await reader.read()
    writer.close()
    response = parse_response(data)
    assert response.status == 200
    return response.body.decode()
