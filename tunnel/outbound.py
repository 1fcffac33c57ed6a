"""Outbound (15001): a connection the app opened, captured inside its pod.

1. Read the original destination.
2. A Service VIP resolves to one endpoint (round-robin, skipping failures).
3. An enrolled destination gets an HBONE stream over a pooled mTLS connection
   that presents the *source* workload's certificate; anything else passes
   through as plain TCP from inside the source pod (its IP kept).
"""

from __future__ import annotations

import logging
import socket
import time

from tunnel.config import INBOUND_HBONE_PORT, PROXY_MARK
from tunnel.context import ProxyInputs
from tunnel.hbone_io import HboneConnection, HboneStream, StreamRejected, TunnelError
from tunnel.metrics import MUTUAL_TLS, PLAINTEXT, connection_labels
from tunnel.netns import original_dst, socket_in
from tunnel.pool import PoolKey
from tunnel.refusals import Direction, outbound_refusal, record_refusal
from tunnel.relay import Endpoint, TcpEndpoint
from tunnel.served import ServedPod
from tunnel.session import Session, relay_session
from tunnel.state import Service, Workload
from tunnel.upstream import accepted_socket, connect_from_pod

_log = logging.getLogger("trellis.tunnel.outbound")
MAX_ENDPOINT_ATTEMPTS = 3


class UpstreamFailed(Exception):
    """No byte moved: the destination could not be reached (reason is a metric label)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


async def handle_outbound(inputs: ProxyInputs, pod: ServedPod, client: TcpEndpoint) -> None:
    started = time.monotonic()
    src = pod.workload
    src_addr = client.peername or ("0.0.0.0", 0)
    try:
        dst_ip, dst_port = original_dst(accepted_socket(client))
    except OSError as exc:
        _failed(inputs, src.key, src_addr, "no_original_dst", exc)
        client.abort()
        return
    # The pod's rules never send loopback or the pod's own IP here: such a target
    # means 15001 was dialled directly, or a loop through the proxy.
    refusal = outbound_refusal((dst_ip, dst_port), src.ip)
    if refusal is not None:
        record_refusal(inputs.metrics, Direction.OUTBOUND, refusal, pod=src.key, src=src_addr,
                       dst=(dst_ip, dst_port))
        client.abort()
        return
    try:
        service = inputs.state.current.service_by_vip(dst_ip)
        target, upstream, dst = await _connect(inputs, pod, service, dst_ip, dst_port)
    except (OSError, UpstreamFailed) as exc:
        reason = exc.reason if isinstance(exc, UpstreamFailed) else "connect_failed"
        _failed(inputs, src.key, src_addr, reason, exc)
        client.abort()
        return
    hbone = isinstance(upstream, HboneStream)
    dst_principal = dst.identity.principal if hbone and dst else None
    labels = connection_labels(
        reporter="source", source=src, source_principal=src.identity.principal,
        destination=dst, destination_principal=dst_principal, service=service,
        security_policy=MUTUAL_TLS if hbone else PLAINTEXT, cluster=inputs.config.cluster)
    await relay_session(inputs, pod, Session(
        direction="outbound", hbone=hbone, labels=labels, src_addr=src_addr, dst_addr=target,
        src_workload=src.key, dst_workload=dst.key if dst else None,
        src_identity=src.identity.uri,
        dst_identity=dst.identity.uri if hbone and dst else None,
        dst_service=service.hostname if service else None, started=started), client, upstream)


def _failed(inputs: ProxyInputs, pod: str, src_addr: tuple[str, int], reason: str,
            exc: BaseException) -> None:
    inputs.metrics.connect_failures.labels("outbound", reason).inc()
    _log.warning("outbound connection failed", extra={"fields": {
        "pod": pod, "src": f"{src_addr[0]}:{src_addr[1]}", "error": str(exc)}})


async def _connect(inputs: ProxyInputs, pod: ServedPod, service: Service | None,
                   dst_ip: str, dst_port: int
                   ) -> tuple[tuple[str, int], Endpoint, Workload | None]:
    state = inputs.state.current
    if service is None:
        dst = state.workload_by_ip(dst_ip)
        return (dst_ip, dst_port), await _connect_one(inputs, pod, dst, dst_ip, dst_port), dst
    target_port = service.target_port(dst_port)
    if target_port is None:
        raise UpstreamFailed("no_service_port", f"{service.key} has no port {dst_port}")
    failed: list[str] = []
    last: UpstreamFailed | None = None
    for _ in range(MAX_ENDPOINT_ATTEMPTS):
        dst = inputs.balancer.pick(state, service, exclude=failed)
        if dst is None:
            break
        try:
            upstream = await _connect_one(inputs, pod, dst, dst.ip, target_port)
        except UpstreamFailed as exc:
            failed.append(dst.ip)
            last = exc
            continue
        return (dst.ip, target_port), upstream, dst
    if last is not None:
        raise last
    raise UpstreamFailed("no_healthy_endpoint", f"service {service.key} has no endpoint")


async def _connect_one(inputs: ProxyInputs, pod: ServedPod, dst: Workload | None,
                       ip: str, port: int) -> Endpoint:
    if dst is not None and dst.enrolled:
        return await _open_hbone(inputs, pod, dst, port)
    try:
        return await connect_from_pod(
            pod.netns, (ip, port), timeout=inputs.config.connect_timeout_s,
            write_high_water=inputs.config.relay_write_high_water_bytes)
    except (TimeoutError, OSError) as exc:
        raise UpstreamFailed("connect_failed", f"{ip}:{port}: {exc or 'timeout'}") from exc


async def _open_hbone(inputs: ProxyInputs, pod: ServedPod, dst: Workload,
                      port: int) -> HboneStream:
    src = pod.workload
    key = PoolKey(src.identity, src.ip, dst.identity, (dst.ip, INBOUND_HBONE_PORT))

    async def connect() -> HboneConnection:
        ctx = await inputs.tls.client_context(src.identity)
        sock = socket_in(pod.netns, socket.AF_INET, socket.SOCK_STREAM, mark=PROXY_MARK)
        return await HboneConnection.connect(
            sock, key.dst, ctx, dst.identity, trust_domain=inputs.config.trust_domain,
            connect_timeout=inputs.config.connect_timeout_s)

    try:
        conn = await inputs.pool.acquire(key, connect)
        return await conn.open_stream(f"{dst.ip}:{port}", [("forwarded", f'for="{src.ip}"')])
    except StreamRejected as exc:
        raise UpstreamFailed(exc.reason, f"{dst.key}: HTTP {exc.status}") from exc
    except (TimeoutError, OSError, ValueError, TunnelError) as exc:
        raise UpstreamFailed("hbone_connect_failed", f"{dst.key}: {exc or 'timeout'}") from exc
