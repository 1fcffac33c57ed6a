"""Drain on SIGTERM: let live connections finish, up to a deadline.

Kubernetes sends SIGTERM and kills the pod ``terminationGracePeriodSeconds``
later. Between the two the agent keeps its listeners and lets the connections
it relays end on their own; whatever is still open at the deadline is closed by
the normal shutdown that follows. The deadline (``--drain-seconds``) is set by
the chart to the grace period minus 5 s, as ztunnel does, so the shutdown itself
still fits in the grace period. New connections are still accepted meanwhile:
a node has one agent, and refusing them would fail the pods' traffic sooner
than the pod's own termination does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

_log = logging.getLogger("trellis.nodeagent")
POLL_S = 0.1


async def drain(live_connections: Callable[[], int], deadline_s: float) -> int:
    """Wait until ``live_connections()`` is 0 or ``deadline_s`` passed; return what is left."""
    if deadline_s <= 0:
        return live_connections()
    started = time.monotonic()
    left = live_connections()
    _log.info("draining", extra={"fields": {"live_connections": left,
                                            "deadline_s": deadline_s}})
    while left and time.monotonic() - started < deadline_s:
        await asyncio.sleep(POLL_S)
        left = live_connections()
    _log.info("drain finished", extra={"fields": {
        "live_connections": left, "took_s": round(time.monotonic() - started, 3)}})
    return left
