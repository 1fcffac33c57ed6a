"""An HBONE data path on 127.0.0.1 for in-process tests, built the way the proxy will be.

    app client ─TCP─▶ outbound listener ─HBONE(mTLS)─▶ serve_hbone ─TCP─▶ app server
                      (TcpEndpoint ⇄ pooled stream)      (stream ⇄ TcpEndpoint)
"""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from identity.certs import CertBundle
from identity.spiffe import Identity
from tunnel import hbone, tasks, tls
from tunnel.handshake_limit import HandshakeGate
from tunnel.hbone_io import HboneConnection, HboneListener, InboundRequest, serve_hbone
from tunnel.pool import HboneConnectionPool, PoolKey
from tunnel.relay import SpliceHandle, TcpEndpoint, connect_tcp, splice, start_splice

T = TypeVar("T")
TRUST_DOMAIN = "cluster.local"


def run(main: Callable[[], Coroutine[Any, Any, T]], timeout: float = 20.0) -> T:
    """Run `main()` on a fresh uvloop event loop, as the agent does.

    Leaked sockets and servers fail the test. They are collected, not raised,
    while the loop closes: with ``filterwarnings = error`` a ResourceWarning
    raised inside uvloop's ``close()`` leaves it hanging for good, which would
    turn any failing test (that leaks on its way out) into a stuck suite.
    """
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    try:
        result = runner.run(asyncio.wait_for(main(), timeout))
    except BaseException:
        _close_quietly(runner)
        raise
    leaks = _close_quietly(runner)
    assert not leaks, f"the test leaked: {leaks}"
    return result


def _close_quietly(runner: asyncio.Runner) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        runner.close()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.setblocking(False)
    return sock


def client_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


class InboundRelay:
    """The destination side's inbound handler: connect upstream, answer, splice."""

    def __init__(self) -> None:
        self.requests: list[InboundRequest] = []
        self.handles: list[SpliceHandle] = []
        self.reject_with: int | None = None
        self.handle_ready = asyncio.Event()

    async def __call__(self, request: InboundRequest) -> None:
        self.requests.append(request)
        if self.reject_with is not None:
            request.reject(self.reject_with)
            return
        try:
            upstream = await connect_tcp(client_socket(), request.address, timeout=5)
        except OSError:
            request.reject(503)
            return
        stream = await request.accept()
        handle = start_splice(stream, upstream)
        self.handles.append(handle)
        self.handle_ready.set()
        await handle.wait()


class HboneEnv:
    """Certificates, an HBONE server and a pooled client, torn down by `close`."""

    def __init__(self, client_bundle: CertBundle, server_bundle: CertBundle,
                 *, handler: Callable[[InboundRequest], Awaitable[None]] | None = None,
                 expected_peer: Identity | None = None, idle_timeout: float = 300.0,
                 gate: HandshakeGate | None = None,
                 max_streams: int = hbone.MAX_CONCURRENT_STREAMS,
                 pool_streams: int = hbone.MAX_CONCURRENT_STREAMS,
                 connect_timeout: float = 5.0, socket_buffers: int | None = None) -> None:
        self.client_bundle = client_bundle
        self.server_bundle = server_bundle
        self.inbound = InboundRelay()
        self.handler = handler or self.inbound
        self.expected_peer = expected_peer or server_bundle.identity
        self.client_ctx = tls.client_context(client_bundle)
        self.server_ctx = tls.server_context(server_bundle)
        self.pool = HboneConnectionPool(idle_timeout=idle_timeout,
                                        max_streams_per_connection=pool_streams)
        self.tls_connections = 0
        self.gate = gate or HandshakeGate()
        self.max_streams = max_streams
        self.connect_timeout = connect_timeout
        # Kernel buffers of the HBONE sockets (both ends): small, to make the TLS
        # queues fill on loopback.
        self.socket_buffers = socket_buffers
        self.listener: HboneListener | None = None
        self._servers: list[asyncio.Server | HboneListener] = []
        self.hbone_address: tuple[str, int] = ("", 0)
        self.outbound_address: tuple[str, int] = ("", 0)

    async def start(self) -> HboneEnv:
        sock = self._sized(listening_socket())
        self.hbone_address = sock.getsockname()
        server = await serve_hbone(sock, self.server_ctx, self._count_and_handle,
                                   trust_domain=TRUST_DOMAIN, gate=self.gate,
                                   max_streams=self.max_streams)
        self.listener = server
        self._servers.append(server)
        out_sock = listening_socket()
        self.outbound_address = out_sock.getsockname()
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(
            lambda: TcpEndpoint(self._on_outbound), sock=out_sock))
        return self

    async def _count_and_handle(self, request: InboundRequest) -> None:
        await self.handler(request)

    def key(self, dst: tuple[str, int] | None = None) -> PoolKey:
        return PoolKey(self.client_bundle.identity, "127.0.0.1", self.expected_peer,
                       dst or self.hbone_address)

    async def connect(self) -> HboneConnection:
        self.tls_connections += 1
        return await HboneConnection.connect(
            self._sized(client_socket()), self.hbone_address, self.client_ctx, self.expected_peer,
            trust_domain=TRUST_DOMAIN, connect_timeout=self.connect_timeout)

    def _sized(self, sock: socket.socket) -> socket.socket:
        if self.socket_buffers is not None:  # accepted sockets inherit the listener's
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.socket_buffers)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.socket_buffers)
        return sock

    def _on_outbound(self, endpoint: TcpEndpoint) -> None:
        tasks.spawn(self._outbound(endpoint), name="test-outbound")

    async def _outbound(self, endpoint: TcpEndpoint) -> None:
        """Relay one app connection through a pooled tunnel to the app server."""
        authority = f"{self.app_address[0]}:{self.app_address[1]}"
        try:
            stream = await self.pool.open_stream(self.key(), self.connect, authority, [])
        except Exception:
            endpoint.abort()
            raise
        await splice(endpoint, stream)

    app_address: tuple[str, int] = ("127.0.0.1", 1)

    async def close(self) -> None:
        await self.pool.close_all()
        for server in self._servers:
            server.close()
        for handle in self.inbound.handles:
            handle.close("test over")
        for server in self._servers:
            await server.wait_closed()
        await asyncio.sleep(0)
