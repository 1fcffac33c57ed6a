"""The CA's HTTPS endpoint: asyncio + ssl around the pure `CaApi`.

One request per connection, answered and closed; each read is bounded by the
parser's size limits and by `request_timeout`, so a slow or hostile client
costs one small buffer for a bounded time. Signing requests pass the
`identity.ca_limits` gate (per-source and global token buckets, a cap on
concurrent authentications) before any TokenReview; a refusal is a 429 with
Retry-After.

Metrics are not on this port: like istiod's monitoring port 15014 beside its CA
port 15012, they are served in plain HTTP on a listener of their own
(`metrics_port`, on 127.0.0.1 unless told otherwise), which serves
`/metrics` and nothing else, so the API port exposes no label of the CA's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType

from identity.ca import CertificateAuthority, WorkloadRegistry
from identity.ca_api import SIGN_PATH, ApiResponse, CaApi, CaMetrics
from identity.ca_limits import SignGate, SignLimits
from identity.http1 import HttpError, Request, RequestParser, render_response
from identity.node_auth import NodeAuthenticator
from identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity, InvalidIdentity
from identity.tls_pem import load_cert_chain_pem

log = logging.getLogger("trellis.ca")

CA_PORT = 15012
MAX_WORKLOAD_LIFETIME = timedelta(days=90)


@dataclass(frozen=True)
class CaServerConfig:
    """Settings of `trellis ca serve`; invalid values fail here, naming the setting.

    `server_names` are extra IPs or DNS names for the CA's serving certificate,
    beyond `host` and `trellis-ca` (say, the address agents dial when
    listening on 0.0.0.0).
    """

    host: str = "127.0.0.1"  # the listen address
    port: int = CA_PORT
    lifetime: timedelta = timedelta(hours=24)
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    server_names: tuple[str, ...] = ()
    request_timeout: float = 10.0
    # The monitoring listener (plain HTTP, /metrics only); None: none.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    limits: SignLimits = field(default_factory=SignLimits)

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(
                f"CaServerConfig.host: {self.host!r} is not an IP address") from None
        if not 0 <= self.port <= 65535:  # 0 asks the kernel for a free port (tests)
            raise ValueError(f"CaServerConfig.port: {self.port} is not in 0..65535")
        if not timedelta(minutes=1) <= self.lifetime <= MAX_WORKLOAD_LIFETIME:
            raise ValueError(f"CaServerConfig.lifetime: {self.lifetime} is not between "
                             f"1 minute and {MAX_WORKLOAD_LIFETIME.days} days")
        try:
            Identity.of("default", "default", self.trust_domain)
        except InvalidIdentity:
            raise ValueError(f"CaServerConfig.trust_domain: {self.trust_domain!r} is not a "
                             f"valid trust domain") from None
        if not self.request_timeout > 0:
            raise ValueError(f"CaServerConfig.request_timeout: {self.request_timeout} must be > 0")
        try:
            ipaddress.ip_address(self.metrics_host)
        except ValueError:
            raise ValueError(f"CaServerConfig.metrics_host: {self.metrics_host!r} is not an "
                             "IP address") from None
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"CaServerConfig.metrics_port: {self.metrics_port} is not in "
                             "0..65535")


class CaServer:
    """A listening CA endpoint. `close()` stops it; `wait_closed()` waits for open requests."""

    def __init__(self, config: CaServerConfig, api: CaApi, metrics: CaMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._api = api
        self._gate = SignGate(config.limits)
        self._server: asyncio.Server | None = None
        self._metrics_server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def _listen(self, context: ssl.SSLContext) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, self.config.host, self.config.port,
            ssl=context, ssl_handshake_timeout=self.config.request_timeout)
        if self.config.metrics_port is not None:
            self._metrics_server = await asyncio.start_server(
                self._serve_metrics, self.config.metrics_host, self.config.metrics_port)

    @property
    def metrics_url(self) -> str | None:
        """http://HOST:PORT of the monitoring listener, or None without one."""
        if self._metrics_server is None:
            return None
        host, port = self._metrics_server.sockets[0].getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def port(self) -> int:
        assert self._server is not None, "CaServer is not listening"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.host
        return f"https://{f'[{host}]' if ':' in host else host}:{self.port}"

    def close(self) -> None:
        for server in (self._server, self._metrics_server):
            if server is not None:
                server.close()
        for task in self._handlers:
            task.cancel()

    async def wait_closed(self) -> None:
        for server in (self._server, self._metrics_server):
            if server is not None:
                await server.wait_closed()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> CaServer:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
        await self.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        await self._serve(reader, writer, self._read_and_answer)

    async def _serve_metrics(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await self._serve(reader, writer, self._answer_metrics)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     answer: Callable[[asyncio.StreamReader, str],
                                      Awaitable[ApiResponse | None]]) -> None:
        # asyncio.start_server already runs each connection in its own task; we
        # only remember it so close() can cancel the ones still running.
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        peer = _peer_of(writer)
        try:
            response = await answer(reader, peer)
            if response is not None:
                writer.write(render_response(response.status, response.body,
                                             content_type=response.content_type,
                                             extra_headers=response.headers))
                await writer.drain()
        except (OSError, ssl.SSLError) as exc:
            log.debug("connection from %s failed: %s", peer, exc, extra={"fields": {"peer": peer}})
        finally:
            self._handlers.discard(task)
            writer.close()
            try:
                async with asyncio.timeout(1):
                    await writer.wait_closed()
            except (OSError, ssl.SSLError, TimeoutError):
                pass  # the peer went away mid-shutdown; nothing left to tell it

    async def _read(self, reader: asyncio.StreamReader,
                    peer: str) -> Request | ApiResponse | None:
        """The request; or the answer to one the parser refused; or None if the client left."""
        parser = RequestParser()
        try:
            async with asyncio.timeout(self.config.request_timeout):
                while True:
                    data = await reader.read(65536)
                    if not data:
                        return None  # the client left before finishing its request
                    request = parser.feed(data)
                    if request is not None:
                        return request
        except HttpError as exc:
            return self._api.reject_unparsed(exc, parser.target, peer)
        except TimeoutError:
            return self._api.reject_unparsed(
                HttpError(408, f"request not received within {self.config.request_timeout}s"),
                parser.target, peer)

    async def _read_and_answer(self, reader: asyncio.StreamReader,
                               peer: str) -> ApiResponse | None:
        request = await self._read(reader, peer)
        if not isinstance(request, Request):
            return request
        if (request.method, request.target) != ("POST", SIGN_PATH):
            return self._api.handle(request, peer)  # cheap: no authentication, no signing
        refused = self._gate.admit(peer.rpartition(":")[0],
                                   asyncio.get_running_loop().time())
        if refused is not None:
            return self._api.limited(refused)
        try:
            # Off the loop: signing is CPU work, and an authenticator may block on a
            # remote check (nodeagent.k8s_auth asks the Kubernetes API server).
            return await asyncio.to_thread(self._api.handle, request, peer)
        finally:
            self._gate.done()

    async def _answer_metrics(self, reader: asyncio.StreamReader,
                              peer: str) -> ApiResponse | None:
        request = await self._read(reader, peer)
        return self._api.metrics_handle(request) if isinstance(request, Request) else request


def server_ssl_context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    load_cert_chain_pem(context, chain_pem, key_pem)
    return context


async def serve_ca(config: CaServerConfig, ca: CertificateAuthority,
                   registry: WorkloadRegistry, authenticator: NodeAuthenticator) -> CaServer:
    """Start the CA's HTTPS API; it serves with a certificate the CA issues itself."""
    if config.trust_domain != ca.trust_domain:
        raise ValueError(f"CaServerConfig.trust_domain {config.trust_domain!r} differs from "
                         f"the CA's trust domain {ca.trust_domain!r}")
    credentials = ca.issue_server_credentials([config.host, *config.server_names])
    metrics = CaMetrics()
    api = CaApi(ca=ca, registry=registry, authenticator=authenticator,
                lifetime=config.lifetime, metrics=metrics)
    server = CaServer(config, api, metrics)
    await server._listen(server_ssl_context(credentials.chain_pem, credentials.key_pem))
    log.info("ca listening", extra={"fields": {
        "url": server.url, "metrics_url": server.metrics_url, "trust_domain": ca.trust_domain,
        "lifetime_seconds": config.lifetime.total_seconds()}})
    return server


def _peer_of(writer: asyncio.StreamWriter) -> str:
    peername = writer.get_extra_info("peername")
    return f"{peername[0]}:{peername[1]}" if peername else "unknown"
