"""How many connections the proxy holds, how long an idle relay lives, and its fds.

One proxy serves every pod on its node, so one pod (or one peer) that opens
connections without end must not take the others down with it:

- `ConnectionLimits` admits a connection (an accepted TCP connection on 15001
  or 15006, a CONNECT stream on 15008) only below ``max_connections_per_pod``
  for its pod and ``max_connections_per_node`` overall; beyond, it is refused
  at once (TCP RST, or 503 on HBONE), counted and logged at a bounded rate.
  Admission is two integer comparisons; the count drops when the handler ends.
- `IdleSweeper` closes relays that moved no byte either way for
  ``relay_idle_timeout_s``. It reads the byte counters the relay keeps anyway,
  every eighth of the timeout (at most once a minute), so the byte path pays
  nothing: no timer is armed or reset per read.
- `raise_fd_limit` lifts RLIMIT_NOFILE at start to what the node limit needs
  (two fds a connection). Where the fds stay short (no CAP_SYS_RESOURCE to lift
  the hard limit), the node limit is lowered to one fd a connection, its
  accepted socket: an HBONE relay (one socket on each proxy) then always fits;
  past half of it, plaintext and passthrough relays (two sockets) can run out:
  an upstream socket() then fails that connection alone (a counted connect
  failure), and an accept that finds no fd is closed by libuv at once, until
  fds free up.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable, Iterable

from tunnel.config import ProxyConfig
from tunnel.lograte import RateLimitedLog
from tunnel.metrics import ProxyMetrics
from tunnel.refusals import Refusal
from tunnel.relay import TcpEndpoint
from tunnel.served import ServedPod

_log = logging.getLogger("trellis.tunnel.limits")
_events = RateLimitedLog(_log)

# A relayed connection holds at most two sockets (downstream, upstream; an HBONE
# side shares its TLS connection's). Kept apart: listeners (three per pod), pod
# namespaces, pooled and pending TLS connections, the control and admin sockets.
FDS_PER_CONNECTION = 2
RESERVED_FDS = 1024

PodsView = Callable[[], Iterable[ServedPod]]


def fds_needed(config: ProxyConfig) -> int:
    return config.max_connections_per_node * FDS_PER_CONNECTION + RESERVED_FDS


def raise_fd_limit(needed: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Raise RLIMIT_NOFILE towards ``needed``; return (before, after) as (soft, hard).

    The soft limit goes to the hard one; where the hard one is lower than
    ``needed`` and the process may raise it (root, up to fs.nr_open), both go to
    ``needed``. Lowering never happens."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = before
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            except (ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        else:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return before, resource.getrlimit(resource.RLIMIT_NOFILE)


def fd_budget() -> int:
    """How many accepted sockets this process's soft RLIMIT_NOFILE leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, soft - RESERVED_FDS)


class ConnectionLimits:
    """Counts connections per pod (`ServedPod.active`) and per node, and admits them."""

    def __init__(self, config: ProxyConfig, metrics: ProxyMetrics, pods: PodsView) -> None:
        self.per_pod = config.max_connections_per_pod
        self.per_node = min(config.max_connections_per_node, fd_budget())
        if self.per_node < config.max_connections_per_node:
            _log.warning("connection limit lowered to what RLIMIT_NOFILE allows", extra={
                "fields": {"max_connections_per_node": config.max_connections_per_node,
                           "in_force": self.per_node,
                           "nofile_soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}})
        self.per_pod = min(self.per_pod, self.per_node)
        self.active = 0
        self._pods = pods
        metrics.connection_limit.labels("node").set(self.per_node)
        metrics.connection_limit.labels("pod").set(self.per_pod)
        # Read at scrape time, on the loop's thread (the admin server is async).
        metrics.active_connections.labels("node").set_function(lambda: self.active)
        metrics.active_connections.labels("busiest_pod").set_function(self._busiest)
        metrics.write_paused.set_function(self._write_paused)

    def admit(self, pod: ServedPod) -> Refusal | None:
        """Count one more connection for ``pod``, or say which limit refuses it."""
        if self.active >= self.per_node:
            reason, limit = Refusal.NODE_LIMIT, self.per_node
        elif pod.active >= self.per_pod:
            reason, limit = Refusal.POD_LIMIT, self.per_pod
        else:
            self.active += 1
            pod.active += 1
            return None
        _events.log(logging.WARNING, reason, "connection limit reached", {
            "pod": pod.workload.key, "reason": reason.value, "limit": limit})
        return reason

    def release(self, pod: ServedPod) -> None:
        self.active -= 1
        pod.active -= 1

    def _busiest(self) -> int:
        return max((p.active for p in self._pods()), default=0)

    def _write_paused(self) -> int:
        paused = 0
        for pod in self._pods():
            for live in pod.connections:
                handle = live.handle
                if handle is not None and any(
                        isinstance(e, TcpEndpoint) and e.writing_paused
                        for e in (handle.a, handle.b)):
                    paused += 1
        return paused


class IdleSweeper:
    """Closes relays that moved no byte for ``timeout_s`` (0: never; `run` returns)."""

    def __init__(self, timeout_s: float, metrics: ProxyMetrics, pods: PodsView) -> None:
        self.timeout_s = timeout_s
        self.interval_s = min(max(timeout_s / 8, 0.05), 60.0)
        self._metrics = metrics
        self._pods = pods

    async def run(self) -> None:
        if self.timeout_s <= 0:
            return
        while True:
            await asyncio.sleep(self.interval_s)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> int:
        """Close what has been idle since ``now - timeout_s``; return how many."""
        closed = 0
        for pod in list(self._pods()):
            for live in list(pod.connections):
                handle = live.handle
                if handle is None or handle.done:
                    continue
                moved = handle.a_to_b + handle.b_to_a
                if moved != live.bytes_seen:
                    live.bytes_seen, live.active_at = moved, now
                elif now - live.active_at >= self.timeout_s:
                    handle.close("idle timeout")
                    self._metrics.idle_closed.labels(live.direction).inc()
                    closed += 1
                    _events.log(logging.INFO, "idle", "idle relay closed", {
                        "pod": pod.workload.key, "direction": live.direction,
                        "relay_idle_timeout_s": self.timeout_s})
        return closed
