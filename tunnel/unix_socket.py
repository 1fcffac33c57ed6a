"""Unix sockets that hand out power (the control socket, the CNI socket): private from
the first instant, and only for the peers we expect.

``bind`` creates the socket file with the process umask's mode, and a
``chmod`` after it leaves a window in which anyone may connect. Setting the
umask around ``bind`` would change it for every thread of the process. So the
socket is bound inside a fresh 0700 directory next to its final path, made
0600 there, and renamed into place: no one but root and us can reach it before
it is private, and the rename also replaces a stale socket file atomically.

``SO_PEERCRED`` then names who connected (the kernel fills it at ``connect``;
the peer cannot forge it): root, or the uid the deployment configures, and
nobody else, whatever the file mode says.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int  # 0 when the peer is in a pid namespace that cannot see it
    uid: int
    gid: int


def default_allowed_uids() -> frozenset[int]:
    """Root, and the uid this process runs as (the agent and proxy share one)."""
    return frozenset({0, os.geteuid()})


def bind_private_unix_socket(path: Path, kind: int = socket.SOCK_STREAM, *,
                             backlog: int = 16) -> socket.socket:
    """A listening, non-blocking unix socket at ``path``, mode 0600 from its first
    moment; a file already at ``path`` (a stale socket) is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Short names: a unix socket path has 107 bytes at most.
    private = Path(tempfile.mkdtemp(prefix=".b", dir=path.parent))  # mode 0700
    staged = private / "s"
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.bind(str(staged))
        os.chmod(staged, 0o600)
        os.replace(staged, path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        raise
    finally:
        private.rmdir()
    return sock


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    return PeerCredentials(pid, uid, gid)


def peer_refusal(sock: socket.socket, allowed_uids: Collection[int]) -> str | None:
    """Why the peer of ``sock`` may not talk to us, or None when it may."""
    try:
        peer = peer_credentials(sock)
    except OSError as exc:
        return f"peer credentials unreadable: {exc.strerror}"
    if peer.uid not in allowed_uids:
        return f"peer uid {peer.uid} (pid {peer.pid}) is not one of {sorted(allowed_uids)}"
    return None
