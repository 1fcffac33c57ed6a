"""Opening plain TCP connections from inside a pod's namespace.

Both directions need this: outbound passthrough connects from the source pod,
and inbound delivery connects to the app from a transparent socket that keeps
the original client's IP as its source.
"""

from __future__ import annotations

import socket

from tunnel.config import PROXY_MARK
from tunnel.netns import NetnsHandle, socket_in
from tunnel.relay import WRITE_HIGH_WATER, TcpEndpoint, connect_tcp


async def connect_from_pod(netns: NetnsHandle, address: tuple[str, int], *, timeout: float,
                           source_ip: str | None = None,
                           write_high_water: int = WRITE_HIGH_WATER) -> TcpEndpoint:
    """Connect from ``netns``; with ``source_ip``, bind it transparently as the source.

    The socket carries the proxy mark, so the pod's rules neither redirect it nor
    (for a transparent one) let the app's replies leave the pod.
    """
    sock = socket_in(netns, socket.AF_INET, socket.SOCK_STREAM, mark=PROXY_MARK,
                     transparent=source_ip is not None)
    if source_ip is not None:
        try:
            sock.bind((source_ip, 0))
        except OSError:
            sock.close()
            raise
    return await connect_tcp(sock, address, timeout=timeout,
                             write_high_water=write_high_water)


def accepted_socket(endpoint: TcpEndpoint) -> socket.socket:
    """The socket under an accepted connection (for SO_ORIGINAL_DST)."""
    assert endpoint.transport is not None
    sock: socket.socket = endpoint.transport.get_extra_info("socket")
    return sock
