"""One proxied connection from splice to access log, shared by every direction.

A handler works out who talks to whom, connects both ends, then hands them to
``relay_session``, which registers the connection (so it can be closed from
outside), counts it under Istio's metrics, copies, and logs one line at close.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tunnel.accesslog import ConnectionRecord, log_connection
from tunnel.context import ProxyInputs
from tunnel.lograte import RateLimitedLog
from tunnel.metrics import ConnectionLabels
from tunnel.relay import Endpoint, TcpEndpoint, WriteFullCallback, start_splice
from tunnel.served import LiveConnection, ServedPod

# Back-pressure is normal (a slow reader); a line a minute says the cap is in use.
_write_full_log = RateLimitedLog(logging.getLogger("trellis.tunnel.relay"), interval_s=60.0)


@dataclass(frozen=True, slots=True)
class Session:
    """Facts fixed when a connection is set up; ``downstream`` is the caller's side."""

    direction: str             # "outbound" | "inbound"
    hbone: bool
    labels: ConnectionLabels
    src_addr: tuple[str, int]
    dst_addr: tuple[str, int]
    src_workload: str | None
    dst_workload: str | None
    src_identity: str | None   # full SPIFFE URI, None for plaintext
    dst_identity: str | None
    dst_service: str | None
    started: float


async def relay_session(inputs: ProxyInputs, pod: ServedPod, session: Session,
                        downstream: Endpoint, upstream: Endpoint) -> None:
    live = LiveConnection(session.direction, session.labels, session.src_addr[0],
                          session.src_identity, session.dst_addr[1])
    inputs.metrics.on_open(session.labels)
    pod.connections.add(live)
    try:
        live.handle = start_splice(downstream, upstream, _count_write_full(inputs))
        result = await live.handle.wait()
    finally:
        pod.connections.discard(live)
    inputs.metrics.on_close(session.labels, request_bytes=result.a_to_b,
                            response_bytes=result.b_to_a)
    log_connection(ConnectionRecord(
        direction=session.direction, protocol="hbone" if session.hbone else "tcp",
        src_addr=_fmt(session.src_addr), dst_addr=_fmt(session.dst_addr),
        src_workload=session.src_workload, dst_workload=session.dst_workload,
        src_identity=session.src_identity, dst_identity=session.dst_identity,
        dst_service=session.dst_service, bytes_to_dst=result.a_to_b,
        bytes_from_dst=result.b_to_a,
        duration_ms=round((time.monotonic() - session.started) * 1000, 3),
        error=result.error))


def _count_write_full(inputs: ProxyInputs) -> WriteFullCallback:
    metrics = inputs.metrics
    fields = {"relay_write_high_water_bytes": inputs.config.relay_write_high_water_bytes}

    def on_write_full(endpoint: Endpoint) -> None:
        # Only a TCP socket's buffer is capped by relay_write_high_water_bytes; an
        # HBONE stream pauses on its flow-control windows (tunnel/hbone_io.py).
        if isinstance(endpoint, TcpEndpoint):
            metrics.write_pauses.inc()
            _write_full_log.log(logging.INFO, "write_full", "relay write buffer at its cap; "
                                "reading the other side paused", fields)

    return on_write_full


def _fmt(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"
