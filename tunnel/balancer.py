"""Choosing an endpoint for a Service VIP.

Round-robin over the Service's enrolled-or-not endpoints, skipping endpoints the
caller saw fail on this connection. That is all issue 2 asks for; locality and
least-request balancing are the waypoint's job later.
"""

from __future__ import annotations

from collections.abc import Collection

from tunnel.state import MeshState, Service, Workload


class RoundRobin:
    def __init__(self) -> None:
        # Per-service cursor; only ever grows by one per pick, wraps by modulo.
        self._cursor: dict[str, int] = {}

    def pick(self, state: MeshState, service: Service,
             exclude: Collection[str] = ()) -> Workload | None:
        endpoints = [w for w in state.endpoints(service) if w.ip not in exclude]
        if not endpoints:
            return None
        n = self._cursor.get(service.key, 0)
        self._cursor[service.key] = n + 1
        return endpoints[n % len(endpoints)]
