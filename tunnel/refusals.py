"""Connections the proxy refuses before it connects anywhere, and why.

**Self-connection loops (issue 10, finding 1).** The proxy's own sockets in a
pod carry its mark, which the pod's rules let through unredirected, so a
connection the proxy makes to one of its own listeners is accepted by that
listener and handled again, and again: one SYN to ``pod-ip:15006`` from an
unenrolled client (a plaintext connection that was not redirected has the
listener itself as its original destination) made 501 relayed connections and
exhausted the fd limit within half a second. So, as ztunnel does with its
"illegal ports", a target port of the proxy's own (`ProxyConfig.own_ports`) is
refused on the inbound paths, and the outbound side refuses targets that the
pod's rules never redirect to it: loopback and the pod's own IP. Those arrive
on 15001 only when something dialled 15001 directly, or from a loop.

Every refusal is one set lookup or string comparison at accept time, counted in
``trellis_connections_refused_total{direction, reason}``, and logged at a
bounded rate (a peer can trigger it at will).
"""

from __future__ import annotations

import logging
from enum import StrEnum

from tunnel.lograte import RateLimitedLog
from tunnel.metrics import ProxyMetrics


class Direction(StrEnum):
    OUTBOUND = "outbound"   # captured on 15001
    INBOUND = "inbound"     # 15006 plaintext or 15008 HBONE


class Refusal(StrEnum):
    """Why a connection was refused; the metric's ``reason`` label."""

    OWN_PORT = "own_port"          # the target is a port of the proxy's own: a loop
    LOOPBACK = "loopback"          # outbound to 127.0.0.0/8 or 0.0.0.0: 15001 dialled directly
    OWN_POD = "own_pod"            # outbound to the pod's own IP: never redirected, a loop
    NOT_THIS_POD = "not_this_pod"  # inbound plaintext whose target is not this pod's IP
    NODE_LIMIT = "node_limit"      # max_connections_per_node reached
    POD_LIMIT = "pod_limit"        # max_connections_per_pod reached


def outbound_refusal(dst: tuple[str, int], pod_ip: str) -> Refusal | None:
    """Whether a connection captured on 15001 must not be passed on to ``dst``."""
    ip = dst[0]
    # Connecting to 0.0.0.0 reaches the local host, as 127.0.0.1 does.
    if ip.startswith("127.") or ip == "0.0.0.0":
        return Refusal.LOOPBACK
    if ip == pod_ip:
        return Refusal.OWN_POD
    return None


def inbound_refusal(target: tuple[str, int], pod_ip: str,
                    own_ports: frozenset[int]) -> Refusal | None:
    """Whether an inbound connection for ``target`` must not be delivered to it."""
    if target[0] != pod_ip:
        # Only a connection addressed to the pod belongs to it; anything else was
        # sent to the pod's interface on purpose, and delivering it (with the
        # client's source kept) would make the proxy an open relay.
        return Refusal.NOT_THIS_POD
    if target[1] in own_ports:
        return Refusal.OWN_PORT
    return None


# One per process: it only thins out log lines, and its keys are the enums above.
_events = RateLimitedLog(logging.getLogger("trellis.tunnel.refused"))


def record_refusal(metrics: ProxyMetrics, direction: Direction, reason: Refusal, *,
                   pod: str, src: tuple[str, int] | None = None,
                   dst: tuple[str, int] | None = None) -> None:
    metrics.refusals.labels(direction, reason).inc()
    fields: dict[str, object] = {"pod": pod, "direction": direction.value,
                                 "reason": reason.value}
    if src is not None:
        fields["src"] = f"{src[0]}:{src[1]}"
    if dst is not None:
        fields["dst"] = f"{dst[0]}:{dst[1]}"
    _events.log(logging.WARNING, (direction, reason), "connection refused", fields)
