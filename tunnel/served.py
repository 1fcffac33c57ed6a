"""The proxy's view of one pod it serves, and of its live connections."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tunnel.metrics import ConnectionLabels
from tunnel.netns import NetnsHandle
from tunnel.relay import SpliceHandle
from tunnel.state import Workload


@dataclass(eq=False)
class LiveConnection:
    """A connection being copied; kept so it can be closed from outside.

    ``source_principal``/``source_ip``/``dest_port`` are the facts inbound
    authorization decided on, so a policy change can re-decide it later.
    """

    direction: str
    labels: ConnectionLabels
    source_ip: str
    source_principal: str | None
    dest_port: int
    handle: SpliceHandle | None = None
    started: float = field(default_factory=time.monotonic)
    # For the idle timeout (tunnel/limits.py): bytes relayed when last looked at,
    # and when that number last changed.
    bytes_seen: int = 0
    active_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class ServedPod:
    workload: Workload
    netns: NetnsHandle
    connections: set[LiveConnection] = field(default_factory=set)
    # Connections admitted for this pod and not yet ended, relaying or still being
    # set up (`limits.ConnectionLimits`).
    active: int = 0
