"""Small things done inside a lab namespace from this process, without a subprocess.

setns(2) with CLONE_NEWNET moves only the calling *thread*, and a socket stays in
the namespace it was created in. So the thread enters the namespace, creates a
socket (or writes a sysctl: /proc/sys/net shows the namespace of the thread that
opens it) and goes back, with tunnel/netns.py's switch; the caller then uses the
socket at home. This is cheaper than pyroute2's ``create_socket``, which forks a
child per socket, and it is safe in a process that already runs threads, since
no other thread moves.
"""

from __future__ import annotations

import errno
import http.client
import os
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import TypeVar

from lab.plan import NETNS_DIR
from tunnel.netns import NetnsHandle, inside

T = TypeVar("T")


def run_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` with this thread in ``netns`` and back (tunnel/netns.py's switch,
    the one setns in the tree); return or raise its result. ``fn`` must be short:
    one socket() call or a few sysctl writes."""
    with NetnsHandle(os.path.join(NETNS_DIR, netns)) as handle, inside(handle):
        return fn()


def socket_in(netns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """An IPv4 socket that lives in ``netns``."""
    return run_in_netns(netns, lambda: socket.socket(socket.AF_INET, kind))


def write_sysctls(netns: str, values: Mapping[str, str]) -> None:
    """Set sysctls (``net/ipv4/ip_forward`` → ``1``) inside ``netns``."""
    def write_all() -> None:
        for key, value in values.items():
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)
    run_in_netns(netns, write_all)


def port_in_use(netns: str, port: int, host: str = "0.0.0.0") -> bool:
    """True when something in ``netns`` already listens on ``host:port``."""
    sock = socket_in(netns)
    with sock:
        # SO_REUSEADDR, as every server here sets it: only a listener blocks the
        # bind, not connections lingering in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def connect_in(netns: str, host: str, port: int, timeout: float) -> socket.socket:
    sock = socket_in(netns)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def http_get(netns: str, host: str, port: int, path: str, *, timeout: float = 2.0,
             cafile: str | None = None, server_hostname: str = "") -> tuple[int, bytes]:
    """GET ``path`` from inside ``netns``; HTTPS verified against ``cafile`` when given."""
    sock: socket.socket = connect_in(netns, host, port, timeout)
    if cafile is not None:
        context = ssl.create_default_context(cafile=cafile)
        sock = context.wrap_socket(sock, server_hostname=server_hostname or host)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = sock  # already connected in the right namespace; request() uses it as is
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
