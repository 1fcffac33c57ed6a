"""Inbound: HBONE on 15008 and captured plaintext on 15006, delivered to the app.

Phases, in order: work out who is calling and where to, authorize, connect to
the app from a transparent socket bound to the caller's IP, and only then
answer ``200`` and copy. Errors map to the wire here and nowhere else:
400 a target other than this pod (a malformed one never gets here: the
HBONE core refuses it) or one of the proxy's own ports, 401 denied by policy,
503 app unreachable or a connection limit reached; on plaintext there is no
status to send, so the connection is closed.
"""

from __future__ import annotations

import logging
import time

from tunnel.authorize import decide, record_denial
from tunnel.context import ProxyInputs
from tunnel.hbone_io import InboundRequest
from tunnel.metrics import MUTUAL_TLS, PLAINTEXT, connection_labels
from tunnel.netns import original_dst
from tunnel.refusals import Direction, Refusal, inbound_refusal, record_refusal
from tunnel.relay import Endpoint, TcpEndpoint
from tunnel.served import ServedPod
from tunnel.session import Session, relay_session
from tunnel.upstream import accepted_socket, connect_from_pod

_log = logging.getLogger("trellis.tunnel.inbound")

BAD_REQUEST = 400
UNAUTHORIZED = 401
UNAVAILABLE = 503


async def handle_hbone(inputs: ProxyInputs, pod: ServedPod, request: InboundRequest) -> None:
    started = time.monotonic()
    me = pod.workload
    # The sans-IO core already refused (400) any :authority that is not ip:port,
    # so only the target itself is left to check: it must be this pod.
    target = request.address
    if target[0] != me.ip:
        _log.warning("rejected CONNECT for another target", extra={"fields": {
            "pod": me.key, "authority": request.authority,
            "peer": request.peer_identity.uri, "status": BAD_REQUEST}})
        inputs.metrics.connect_failures.labels("inbound", "bad_authority").inc()
        request.reject(BAD_REQUEST)
        return
    if target[1] in inputs.config.own_ports:  # a loop through the proxy's own listener
        record_refusal(inputs.metrics, Direction.INBOUND, Refusal.OWN_PORT, pod=me.key,
                       src=request.peer_address, dst=target)
        request.reject(BAD_REQUEST)
        return
    # The tunnel's TCP peer is the calling pod itself: its node proxy dials from
    # inside that pod's namespace. A `forwarded` header is trusted only from a
    # waypoint, and Trellis has none yet, so it never changes the source here.
    if request.peer_address is None:  # the tunnel's socket is already gone
        request.reject(BAD_REQUEST)
        return
    source_ip, source_port = request.peer_address
    principal = request.peer_identity.uri
    decision = decide(inputs, me, source_principal=principal, source_ip=source_ip,
                      dest_port=target[1])
    if not decision.allowed:
        record_denial(inputs, pod, decision, source_principal=principal, source_ip=source_ip,
                      source_port=source_port, dest_port=target[1], hbone=True)
        request.reject(UNAUTHORIZED)
        return
    try:
        app = await connect_from_pod(pod.netns, target, source_ip=source_ip,
                                     timeout=inputs.config.connect_timeout_s,
                                     write_high_water=inputs.config.relay_write_high_water_bytes)
    except (TimeoutError, OSError) as exc:
        _app_unreachable(inputs, pod, request.authority, exc)
        request.reject(UNAVAILABLE)
        return
    stream = await request.accept()
    await _deliver(inputs, pod, stream, app, started, (source_ip, source_port), target,
                   principal=principal)


async def handle_plaintext(inputs: ProxyInputs, pod: ServedPod, client: TcpEndpoint) -> None:
    started = time.monotonic()
    me = pod.workload
    source = client.peername or ("0.0.0.0", 0)
    try:
        target = original_dst(accepted_socket(client))
    except OSError as exc:
        _log.warning("no original destination", extra={"fields": {
            "pod": me.key, "src": f"{source[0]}:{source[1]}", "error": str(exc)}})
        client.abort()
        return
    # Not redirected (a SYN to 15006 itself), or for another port of the proxy's, or
    # not for this pod at all: never delivered.
    refusal = inbound_refusal(target, me.ip, inputs.config.own_ports)
    if refusal is not None:
        record_refusal(inputs.metrics, Direction.INBOUND, refusal, pod=me.key, src=source,
                       dst=target)
        client.abort()
        return
    decision = decide(inputs, me, source_principal=None, source_ip=source[0],
                      dest_port=target[1])
    if not decision.allowed:
        record_denial(inputs, pod, decision, source_principal=None, source_ip=source[0],
                      source_port=source[1], dest_port=target[1], hbone=False)
        client.abort()
        return
    try:
        app = await connect_from_pod(pod.netns, target, source_ip=source[0],
                                     timeout=inputs.config.connect_timeout_s,
                                     write_high_water=inputs.config.relay_write_high_water_bytes)
    except (TimeoutError, OSError) as exc:
        _app_unreachable(inputs, pod, f"{target[0]}:{target[1]}", exc)
        client.abort()
        return
    await _deliver(inputs, pod, client, app, started, source, target, principal=None)


def _app_unreachable(inputs: ProxyInputs, pod: ServedPod, target: str,
                     exc: BaseException) -> None:
    inputs.metrics.connect_failures.labels("inbound", "app_unreachable").inc()
    _log.warning("app unreachable", extra={"fields": {
        "pod": pod.workload.key, "target": target, "error": str(exc) or "timeout"}})


async def _deliver(inputs: ProxyInputs, pod: ServedPod, downstream: Endpoint, app: TcpEndpoint,
                   started: float, source: tuple[str, int], target: tuple[str, int], *,
                   principal: str | None) -> None:
    me = pod.workload
    peer = inputs.state.current.workload_by_ip(source[0])
    hbone = principal is not None
    labels = connection_labels(
        reporter="destination", source=peer,
        source_principal=principal.removeprefix("spiffe://") if principal else None,
        destination=me, destination_principal=me.identity.principal, service=None,
        security_policy=MUTUAL_TLS if hbone else PLAINTEXT, cluster=inputs.config.cluster)
    await relay_session(inputs, pod, Session(
        direction="inbound", hbone=hbone, labels=labels, src_addr=source, dst_addr=target,
        src_workload=peer.key if peer else None, dst_workload=me.key, src_identity=principal,
        dst_identity=me.identity.uri, dst_service=None, started=started), downstream, app)
