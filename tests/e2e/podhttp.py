"""HTTP to the lab's demo app from inside a pod, on sockets made in the pod's namespace.

The sockets are created in the pod's network namespace (lab/nsenter.py), so the
pod's redirection applies to them as to the app's own: these connections go
through the node proxy like any other from that pod.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field

from lab import nsenter


@dataclass
class Loop:
    """A request loop on its own thread: counts, and the first few failures."""

    name: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    began: float = field(default_factory=time.monotonic)
    # Held by the loop around each request; whoever takes it pauses the loop.
    gate: threading.Lock = field(default_factory=threading.Lock)

    def failed(self, what: str) -> None:
        what = f"{time.monotonic() - self.began:.1f} s: {what}"
        if len(self.failures) < 20:
            self.failures.append(what)
        else:
            self.failures[-1] = f"… and more; last: {what}"


def request(conn: http.client.HTTPConnection, path: str, expect_pod: str) -> str:
    """The peer address the app saw."""
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200 or json.loads(body)["pod"] != expect_pod:
        raise AssertionError(f"{response.status} {body[:200]!r}")
    return str(json.loads(body)["peer"])


def connection(netns: str, ip: str, timeout: float = 10.0) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(ip, 8080, timeout=timeout)
    conn.sock = nsenter.connect_in(netns, ip, 8080, timeout)
    conn.auto_open = 0  # never reconnect by itself: that would be from the test's netns
    return conn


def gauge(node_netns: str, sample: str) -> int:
    """One sample of a node proxy's metrics, e.g. ``trellis_hbone_pool_connections``."""
    status_code, body = nsenter.http_get(node_netns, "127.0.0.1", 15020, "/metrics")
    assert status_code == 200
    line = next(x for x in body.decode().splitlines() if x.startswith(sample + " "))
    return int(float(line.split()[1]))


def pooled_tunnels(node_netns: str) -> int:
    return gauge(node_netns, "trellis_hbone_pool_connections")


def active_connections(node_netns: str) -> int:
    """Connections the proxy still counts: until each one's handler has returned."""
    return gauge(node_netns, 'trellis_connections_active{scope="node"}')


def burst(loop: Loop, netns: str, ip: str, server: str, count: int) -> None:
    """``count`` connections open at once, a request on each: past 100 streams a tunnel
    is full, so the pool must dial a new one, with the certificate it holds now."""
    conns = []
    try:
        for _ in range(count):
            conns.append(connection(netns, ip))
        for conn in conns:
            request(conn, "/burst", server)
            loop.ok += 1
    except (OSError, AssertionError, http.client.HTTPException, ValueError) as exc:
        loop.failed(f"burst of {count}, connection {len(conns)}: {type(exc).__name__}: {exc}")
    finally:
        for conn in conns:
            conn.close()
