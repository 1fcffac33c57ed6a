"""The proxy's end of the control socket (tunnel/control.py has the protocol).

One agent at a time: a new connection replaces the old one, as a restarted
agent's does. The socket is 0600 from its first moment and takes only peers
whose uid (``SO_PEERCRED``) is root's or the configured one
(tunnel/unix_socket.py): whoever holds it can make the proxy serve any
identity in any namespace. When the agent goes away the proxy changes nothing; it goes on
serving every pod it has until the next agent's replay says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from tunnel import tasks
from tunnel.control import (
    MAX_MESSAGE,
    Ack,
    AddPod,
    ControlError,
    Hello,
    RemovePod,
    Replay,
    SnapshotSent,
    decode,
    encode,
)
from tunnel.netns import CLONE_NEWNET, NetnsHandle
from tunnel.state import Workload
from tunnel.unix_socket import bind_private_unix_socket, default_allowed_uids, peer_refusal

_log = logging.getLogger("trellis.tunnel.control")
# One namespace fd per add_pod; room for a few more so that a confused sender's
# extra fds are received (and closed) rather than leaked by a truncated cmsg.
_MAX_FDS = 4
_NS_GET_NSTYPE = 0xB703  # linux/nsfs.h: _IO(0xb7, 0x3)
PATH_CHECK_S = 2.0  # how often the proxy checks that its socket file is still there


class ServesPods(Protocol):
    """What the control socket drives: tunnel.proxy.Proxy."""

    @property
    def pods(self) -> Mapping[str, Any]: ...

    async def add_pod(self, workload: Workload, netns: str | NetnsHandle) -> None: ...

    async def remove_pod(self, uid: str) -> None: ...


class ControlServer:
    def __init__(self, path: Path, proxy: ServesPods, *,
                 allowed_uids: Collection[int] | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.path = path
        self._proxy = proxy
        self._allowed_uids = frozenset(allowed_uids if allowed_uids is not None
                                       else default_allowed_uids())
        self.refused_peers = Counter(
            "trellis_control_peers_refused", "Connections to the control socket refused "
            "because the peer's uid (SO_PEERCRED) is not allowed",
            registry=registry if registry is not None else CollectorRegistry())
        self._refused = 0  # for the log's rate limit
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._session: asyncio.Task[None] | None = None
        self._agent: socket.socket | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._watching: asyncio.Task[None] | None = None
        # Whether a socket file was at the path when we started (a proxy still
        # running beside us in a surge upgrade, or one that died), and whether an
        # agent has since told us every pod (snapshot_sent): see not_ready_reason.
        self._predecessor = False
        self._replayed = False

    @property
    def agent_connected(self) -> bool:
        return self._agent is not None

    async def start(self) -> None:
        """Listen on ``path`` (a stale socket file from a killed proxy is replaced)."""
        self._predecessor = self.path.is_socket()
        self._listen()
        self._watching = tasks.spawn(self._watch_path(), name="control socket path")
        _log.info("control socket listening", extra={"fields": {
            "path": str(self.path), "replaced_a_socket": self._predecessor}})

    def _listen(self) -> None:
        sock = bind_private_unix_socket(self.path, socket.SOCK_SEQPACKET, backlog=4)
        if self._listener is not None:
            self._listener.close()
        if self._accepting is not None:
            self._accepting.cancel()
        self._listener = sock
        # A newer proxy (a surge upgrade) may later rename its socket onto this
        # path; close() must then leave the path alone.
        st = self.path.stat()
        self._bound = (st.st_dev, st.st_ino)
        self._accepting = tasks.spawn(self._accept(sock), name="control accept")

    async def _watch_path(self) -> None:
        """Bind again if the socket file vanished: an older proxy, from a release that
        unlinked the path unconditionally, deletes ours when it stops after a surge,
        and no agent could reach us after that. A newer proxy's socket at the path
        is left alone: that proxy serves the node now. One stat per period."""
        while True:
            await asyncio.sleep(PATH_CHECK_S)
            if self.path.exists():
                continue
            _log.warning("control socket file removed by someone else: binding it again",
                         extra={"fields": {"path": str(self.path)}})
            try:
                self._listen()
            except OSError as exc:
                _log.error("control socket not bound again", extra={"fields": {
                    "path": str(self.path), "error": str(exc)}})

    def not_ready_reason(self) -> str | None:
        """Why the proxy must not report ready yet, as far as the agent link goes.

        With a socket already at the path when we started, another proxy may be
        serving this node's pods (a ``maxSurge: 1`` upgrade): Kubernetes stops it
        as soon as we are ready, so we are ready only once the agent has handed
        us every pod (its replay ended with ``snapshot_sent``). On a node with no
        socket file yet (a first install) there is nothing to take over."""
        if self._listener is None:
            return "control socket not open yet"
        if self._predecessor and not self._replayed:
            return (f"another proxy's socket was at {self.path}: waiting for the agent to "
                    "hand this node's pods over")
        return None

    def close(self) -> None:
        for task in (self._accepting, self._session, self._watching):
            if task is not None:
                task.cancel()
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._unlink_if_ours()

    def _unlink_if_ours(self) -> None:
        """Remove the socket file only if it is still the one we bound: during a
        surge upgrade the new proxy's socket sits at the same path, and deleting
        it would cut the agent off from the proxy that now serves the node. (A
        rename between the stat and the unlink is the one race left; only a
        third proxy starting in that instant could hit it.)"""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) != self._bound:
            _log.info("control socket path taken over by a newer proxy: left in place",
                      extra={"fields": {"path": str(self.path)}})
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            refusal = peer_refusal(conn, self._allowed_uids)
            if refusal is not None:
                conn.close()  # before reading a byte: the session in place stays
                self.refused_peers.inc()
                self._refused += 1
                if self._refused == 1 or self._refused % 100 == 0:  # first, then every 100th
                    _log.warning("control connection refused", extra={"fields": {
                        "reason": refusal, "refused_total": self._refused}})
                continue
            conn.setblocking(False)
            if self._session is not None:
                _log.info("a new agent connected: closing the previous connection")
                self._session.cancel()
            self._session = tasks.spawn(self._serve(conn), name="control session")

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._agent = conn
        replay = Replay()
        try:
            while True:
                data, fds = await _receive(loop, conn)
                if not data:
                    break
                reply = await self._handle(data, fds, replay)
                await loop.sock_sendall(conn, encode(reply))
        except OSError as exc:
            _log.warning("control connection failed", extra={"fields": {"error": str(exc)}})
        finally:
            conn.close()
            if self._agent is conn:
                self._agent = None
            _log.info("agent disconnected: serving on", extra={"fields": {
                "pods": len(self._proxy.pods), "replay_complete": replay.complete}})

    async def _handle(self, data: bytes, fds: list[int], replay: Replay) -> Ack:
        """Act on one request. Every fd received is used or closed, whatever happens."""
        try:
            message = decode(data)
        except ControlError as exc:
            _close_all(fds)
            _log.error("control message refused", extra={"fields": {"error": str(exc)}})
            return Ack(str(exc))
        match message:
            case AddPod(workload, netns_path):
                return await self._add(workload, netns_path, fds, replay)
            case RemovePod(uid):
                _close_all(fds)
                replay.forgotten(uid)
                await self._proxy.remove_pod(uid)
                return Ack()
            case SnapshotSent():
                _close_all(fds)
                stale = replay.stale(self._proxy.pods)
                for uid in stale:
                    await self._proxy.remove_pod(uid)
                self._replayed = True
                _log.info("agent replay complete", extra={"fields": {
                    "served": len(self._proxy.pods), "removed": len(stale)}})
                return Ack()
            case Hello(node):
                _close_all(fds)
                _log.info("agent connected", extra={"fields": {
                    "node": node, "pods": len(self._proxy.pods)}})
                return Ack()
        _close_all(fds)
        return Ack(f"control message: {type(message).__name__} is not a request")

    async def _add(self, workload: Workload, netns_path: str, fds: list[int],
                   replay: Replay) -> Ack:
        if len(fds) != 1:
            _close_all(fds)
            return Ack(f"add_pod {workload.key}: expected one namespace fd, got {len(fds)}")
        try:
            # Only a network namespace will do: setns(CLONE_NEWNET) on anything
            # else would fail later, at the first connection, far from the cause.
            if _namespace_type(fds[0]) != CLONE_NEWNET:
                return Ack(f"add_pod {workload.key}: the fd sent for {netns_path!r} is not "
                           "a network namespace")
            # Reopening through /proc gives the handle an fd of its own.
            handle = NetnsHandle.open(f"/proc/self/fd/{fds[0]}")
        except OSError as exc:
            return Ack(f"add_pod {workload.key}: namespace fd: {exc}")
        finally:
            os.close(fds[0])
        handle.path = netns_path  # what log lines and errors should name
        try:
            await self._proxy.add_pod(workload, handle)
        except (OSError, ValueError, TimeoutError) as exc:
            _log.error("pod not served", extra={"fields": {"pod": workload.key,
                                                           "error": str(exc)}})
            return Ack(f"add_pod {workload.key}: {exc or 'certificate timeout'}")
        replay.named(workload.uid)
        return Ack()


async def _receive(loop: asyncio.AbstractEventLoop,
                   conn: socket.socket) -> tuple[bytes, list[int]]:
    """One record and its fds; (b"", []) at end of stream."""
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE, _MAX_FDS)
        except BlockingIOError:
            await _readable(loop, conn)
            continue
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close_all(fds)
            raise OSError("control message truncated (too large, or too many fds)")
        return data, fds


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


def _namespace_type(fd: int) -> int:
    """The CLONE_NEW* type of a namespace fd (ioctl NS_GET_NSTYPE); -1 for any other file."""
    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        return -1


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
