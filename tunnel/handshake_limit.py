"""Bounds on TLS handshakes not finished yet on the HBONE port: per listener, per node, in time.

Before a peer has proved who it is, everything it makes us hold is free for it:
an accepted socket and an SSL object, about 45 KiB (issue 10 measured 2,000 idle
connections to 15008 at +91 MiB, each held for a 10 s deadline). So:

* a handshake has `timeout_s` to finish (a few seconds: a real one takes
  milliseconds, pooling makes them rare);
* at most `per_listener` are pending on one pod's 15008, and `per_node` on all
  of them together;
* at a bound, the oldest pending handshake of the full scope gives way to the
  newcomer if it has waited `evict_after_s` (an idle connection never finishes,
  a real client is long done); otherwise the newcomer is closed at once. So a
  peer that holds many idle connections cannot lock a legitimate one out, and a
  burst of real clients is not cut short.

Every failure, whatever its cause, is counted by `HandshakeFailure` (a fixed set,
the metric's reason label) and logged at a bounded rate.
"""

from __future__ import annotations

import enum
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunnel.lograte import RateLimitedLog

if TYPE_CHECKING:
    import asyncio

    from tunnel.config import ProxyConfig
    from tunnel.metrics import ProxyMetrics

log = logging.getLogger("trellis.tunnel.hbone")


class HandshakeFailure(enum.Enum):
    """Why a connection to the HBONE port never became a tunnel (metric label values)."""

    TIMEOUT = "timeout"              # no finished handshake within timeout_s
    OVER_LIMIT = "over_limit"        # refused or evicted at a pending-handshake bound
    CERTIFICATE = "certificate"      # the client certificate did not verify
    TLS = "tls_error"                # any other TLS failure (version, ALPN, garbage)
    NETWORK = "network"              # reset or closed by the peer mid-handshake
    PEER_IDENTITY = "peer_identity"  # verified, but no SPIFFE ID of our trust domain


@dataclass(frozen=True, slots=True)
class HandshakeLimits:
    per_listener: int = 128
    per_node: int = 512
    timeout_s: float = 5.0
    evict_after_s: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.per_listener <= self.per_node:
            raise ValueError(f"per_listener must be within 1..per_node ({self.per_node}), "
                             f"got {self.per_listener}")
        if not self.timeout_s > 0 or self.evict_after_s < 0:
            raise ValueError("timeout_s must be > 0 and evict_after_s >= 0")

    @classmethod
    def of(cls, config: ProxyConfig) -> HandshakeLimits:
        return cls(per_listener=config.max_pending_handshakes_per_listener,
                   per_node=config.max_pending_handshakes_per_node,
                   timeout_s=config.hbone_handshake_timeout_s)


class Pending:
    """One accepted socket whose handshake has not finished; `release` when it has."""

    __slots__ = ("_released", "_slots", "peer", "sock", "started", "task")

    def __init__(self, slots: ListenerSlots, sock: socket.socket, peer: object,
                 started: float) -> None:
        self._slots = slots
        self.sock = sock
        self.peer = peer
        self.started = started
        self.task: asyncio.Task[None] | None = None
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._slots._forget(self)

    def evict(self) -> None:
        """Give the slot away: the handshake ends now (counted as over_limit)."""
        self.release()
        if self.task is not None:
            self.task.cancel()  # tls_io.handshake closes its SSL socket on the way out
        self.sock.close()       # a no-op once the SSL socket took the descriptor over


class HandshakeGate:
    """One per node: every listener's pending handshakes, oldest first, and the failures."""

    def __init__(self, limits: HandshakeLimits | None = None, *,
                 metrics: ProxyMetrics | None = None) -> None:
        self.limits = limits or HandshakeLimits()
        self._metrics = metrics
        self._pending: dict[Pending, None] = {}  # insertion order: oldest first
        self._log = RateLimitedLog(log)
        self.failures: dict[HandshakeFailure, int] = dict.fromkeys(HandshakeFailure, 0)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def listener(self) -> ListenerSlots:
        return ListenerSlots(self)

    def failed(self, reason: HandshakeFailure, peer: object, detail: str) -> None:
        self.failures[reason] += 1
        if self._metrics is not None:
            self._metrics.handshake_failures.labels(reason.value).inc()
        self._log.log(logging.WARNING, reason, f"refused HBONE connection from {peer}: {detail}",
                      {"peer_address": str(peer), "reason": reason.value, "error": detail})

    def _changed(self) -> None:
        if self._metrics is not None:
            self._metrics.handshakes_pending.set(len(self._pending))


class ListenerSlots:
    """One listener's share of the gate."""

    def __init__(self, gate: HandshakeGate) -> None:
        self._gate = gate
        self._pending: dict[Pending, None] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def admit(self, sock: socket.socket, peer: object, now: float) -> Pending | None:
        """A slot for the handshake on `sock`, or None: then `sock` is closed and counted."""
        gate = self._gate
        limits = gate.limits
        for scope, bound in ((self._pending, limits.per_listener),
                             (gate._pending, limits.per_node)):
            if len(scope) < bound:
                continue
            oldest = next(iter(scope))
            if now - oldest.started < limits.evict_after_s:
                sock.close()
                gate.failed(HandshakeFailure.OVER_LIMIT, peer,
                            "too many TLS handshakes pending; refused")
                return None
            oldest.evict()
            gate.failed(HandshakeFailure.OVER_LIMIT, oldest.peer,
                        "too many TLS handshakes pending; this oldest one gave way")
        pending = Pending(self, sock, peer, now)
        self._pending[pending] = None
        gate._pending[pending] = None
        gate._changed()
        return pending

    def abort_all(self) -> None:
        """The listener closed: end its handshakes too (not counted as failures)."""
        for pending in list(self._pending):
            pending.evict()

    def _forget(self, pending: Pending) -> None:
        self._pending.pop(pending, None)
        self._gate._pending.pop(pending, None)
        self._gate._changed()
