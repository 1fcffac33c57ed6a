"""The one sysctl the agent sets in an enrolled pod's namespace: ``net.ipv4.tcp_migrate_req``.

During a surge upgrade two proxies have listeners on the same pod ports
(``SO_REUSEPORT``), and the old one closes its own when it drains. Without this
sysctl the kernel resets the connections still waiting in the closed listeners'
accept queues (and their half-done handshakes); with it, it moves them to the
other listener of the group, the new proxy's. Per network namespace, since
Linux 5.14.

It is set when redirection is applied and left in place when redirection is
removed: it changes only what happens when a reuseport listener closes with
requests queued, and with no sibling listener left the kernel resets them
exactly as it would without it. Leaving it avoids undoing a value the pod may
have chosen itself.
"""

from __future__ import annotations

import errno
import logging
import os

from nodeagent.redirect import PodNetwork, RedirectError
from tunnel.netns import NetnsHandle, inside

_PATH = "/proc/sys/net/ipv4/tcp_migrate_req"
_log = logging.getLogger("trellis.nodeagent")
_missing_logged = False


def enable_request_migration(pod: PodNetwork, ns: NetnsHandle) -> None:
    """Set ``net.ipv4.tcp_migrate_req=1`` in ``ns`` (idempotent)."""
    try:
        with inside(ns):
            # Opened inside the namespace: /proc/sys/net is the opener's namespace's.
            fd = os.open(_PATH, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"1\n")
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno != errno.ENOENT:
            raise RedirectError(pod, f"sysctl net.ipv4.tcp_migrate_req: {err.strerror}") from err
        # An older kernel: redirection works; only a surge upgrade may reset the
        # connections queued at the old proxy's listeners. Said once, not per pod.
        global _missing_logged
        if not _missing_logged:
            _missing_logged = True
            _log.warning("this kernel has no net.ipv4.tcp_migrate_req (Linux < 5.14): a "
                         "proxy upgrade may reset connections not yet accepted")


def request_migration_enabled(ns: NetnsHandle) -> bool:
    with inside(ns):
        fd = os.open(_PATH, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 8).strip() == b"1"
    finally:
        os.close(fd)
