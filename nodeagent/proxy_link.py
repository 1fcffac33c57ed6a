"""How the agent reaches the node proxy: in its own process, or over the control socket.

The reconciler sees one small surface either way (``PodProxy``). ``connect``
returns a *generation*: it changes whenever the proxy on the other end may have
forgotten what the agent told it (a new connection, perhaps to a restarted
proxy), and the reconciler then replays every pod and ends with
``snapshot_sent``. In-process the proxy never forgets, so the generation never
changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from tunnel.control import (
    Ack,
    AddPod,
    ControlError,
    Hello,
    RemovePod,
    Request,
    SnapshotSent,
    decode,
    encode,
)
from tunnel.proxy import Proxy
from tunnel.state import Workload
from tunnel.unix_socket import default_allowed_uids, peer_credentials, peer_refusal

_log = logging.getLogger("trellis.nodeagent")


class ProxyUnavailable(OSError):
    """The proxy could not be reached or did not answer; the text says where and why."""


class PodProxy(Protocol):
    async def connect(self) -> int: ...

    async def add_pod(self, workload: Workload, netns_path: str) -> None: ...

    async def remove_pod(self, uid: str) -> None: ...

    async def snapshot_sent(self) -> None: ...

    async def close(self) -> None: ...


class LocalProxy:
    """The proxy in this process (``trellis agent run`` without ``--proxy-socket``)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def connect(self) -> int:
        return 0

    async def add_pod(self, workload: Workload, netns_path: str) -> None:
        await self.proxy.add_pod(workload, netns_path)

    async def remove_pod(self, uid: str) -> None:
        await self.proxy.remove_pod(uid)

    async def snapshot_sent(self) -> None:
        pass

    async def close(self) -> None:
        # The process that built the proxy closes it, after draining
        # (ProxyStack.drain_and_close); closing here too would do it twice.
        pass


class RemoteProxy:
    """The node proxy process, over its control socket (``trellis proxy run``).

    Requests go one at a time, each awaiting its ack. Any failure closes the
    connection, so the next ``connect`` opens a new one and the reconciler
    replays everything: simpler, and safer, than guessing what the proxy got.
    """

    def __init__(self, path: Path, node: str, *, timeout_s: float = 30.0,
                 on_connect: Callable[[int], None] | None = None) -> None:
        self.path = path
        self._node = node
        # Called with the proxy's pid (SO_PEERCRED) on every new link: eBPF mode
        # must answer SO_ORIGINAL_DST in the proxy's cgroup, wherever it runs now.
        self._on_connect = on_connect
        # add_pod waits for the pod's certificate, which may take a CA round trip.
        self._timeout = timeout_s
        self._sock: socket.socket | None = None
        # (st_dev, st_ino) of the socket file the link was opened through: one
        # stat per connect() (the reconcile timer's tick) notices a newer proxy.
        self._bound: tuple[int, int] | None = None
        self._refused_newer: tuple[int, int] | None = None
        self._generation = 0
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    async def connect(self) -> int:
        async with self._lock:
            if self._sock is not None and not _alive(self._sock):
                _log.warning("the node proxy closed the control socket; reconnecting",
                             extra={"fields": {"socket": str(self.path)}})
                self._drop()
            # A surge upgrade: the new proxy renamed its socket onto the path.
            # Serve only the newest proxy; the old one keeps its connections
            # and the pods it has, and drains on its own SIGTERM.
            newer = self._sock is not None and self._newer_socket()
            if self._sock is None or newer:
                # Stat before connecting: a rename in between makes the next
                # connect() move again, never miss the newer socket.
                bound = _inode(self.path)
                try:
                    sock = await self._open()
                except ProxyUnavailable as exc:
                    if not newer:
                        raise
                    # The link we have still works: keep it rather than fail
                    # the node; say so once per socket file.
                    if self._refused_newer != bound:
                        self._refused_newer = bound
                        _log.warning("the newer proxy socket is not usable; keeping the "
                                     "current proxy", extra={"fields": {"error": str(exc)}})
                    return self._generation
                if newer:
                    _log.info("a newer node proxy is listening; moved to it",
                              extra={"fields": {"socket": str(self.path)}})
                self._drop()
                self._sock = sock
                self._bound = bound
                await self._request(Hello(self._node))
                self._follow_peer(sock)
                self._generation += 1
                _log.info("connected to the node proxy", extra={"fields": {
                    "socket": str(self.path), "generation": self._generation}})
            return self._generation

    async def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(self.path))
        except OSError as exc:
            sock.close()
            raise ProxyUnavailable(
                exc.errno, f"proxy control socket {self.path}: {exc.strerror}") from exc
        # The agent hands this peer pod namespaces: it must be the proxy
        # (root, or our own uid), not whoever bound the path first.
        refusal = peer_refusal(sock, default_allowed_uids())
        if refusal is not None:
            sock.close()
            raise ProxyUnavailable(f"proxy control socket {self.path}: {refusal}")
        return sock

    def _newer_socket(self) -> bool:
        current = _inode(self.path)
        # No file at the path: the proxy we have is the only one; keep it.
        return current is not None and current != self._bound

    def _follow_peer(self, sock: socket.socket) -> None:
        if self._on_connect is None:
            return
        pid = peer_credentials(sock).pid
        try:
            if pid <= 0:  # another pid namespace: the proxy must share the agent's
                raise OSError("the proxy's pid is not visible from the agent's pid namespace")
            self._on_connect(pid)
        except (OSError, RuntimeError) as exc:  # RuntimeError: eBPF's EbpfUnavailable
            self._drop()
            raise ProxyUnavailable(f"proxy control socket {self.path}: {exc}") from exc

    async def add_pod(self, workload: Workload, netns_path: str) -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open network namespace {netns_path}: "
                                     f"{exc.strerror}") from exc
        try:
            async with self._lock:
                await self._request(AddPod(workload, netns_path), fd)
        finally:
            os.close(fd)

    async def remove_pod(self, uid: str) -> None:
        async with self._lock:
            await self._request(RemovePod(uid))

    async def snapshot_sent(self) -> None:
        async with self._lock:
            await self._request(SnapshotSent())

    async def close(self) -> None:
        self._drop()

    async def _request(self, request: Request, fd: int | None = None) -> None:
        sock = self._sock
        if sock is None:
            raise ProxyUnavailable(f"proxy control socket {self.path}: not connected")
        try:
            reply = await asyncio.wait_for(self._exchange(sock, request, fd), self._timeout)
        except (OSError, TimeoutError, ControlError) as exc:
            self._drop()
            why = str(exc) or f"no answer within {self._timeout:.0f} s"
            raise ProxyUnavailable(f"proxy control socket {self.path}: {why}") from exc
        if reply.error:
            # The proxy refused this one request; the connection is fine.
            raise ValueError(reply.error)

    async def _exchange(self, sock: socket.socket, request: Request, fd: int | None) -> Ack:
        loop = asyncio.get_running_loop()
        data = encode(request)
        # A SEQPACKET record is sent whole or not at all; the socket buffer holds
        # hundreds of these, so a full one means a stuck proxy, and the timeout
        # above ends the wait.
        while True:
            try:
                if fd is None:
                    sock.send(data)
                else:
                    socket.send_fds(sock, [data], [fd])
                break
            except BlockingIOError:
                await asyncio.sleep(0.01)
        reply = await loop.sock_recv(sock, 65536)
        if not reply:
            raise ConnectionResetError("the proxy closed the connection")
        message = decode(reply)
        if not isinstance(message, Ack):
            raise ControlError(f"expected an ack, got {type(message).__name__}")
        return message

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _alive(sock: socket.socket) -> bool:
    """Whether the peer is still there. The proxy never speaks unasked, so anything
    readable between requests is its end of stream (or an error)."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # end of stream, or bytes the proxy never sends unasked
