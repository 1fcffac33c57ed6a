"""Sockets created inside a pod's network namespace, by a process that lives outside it.

A socket belongs to the namespace it was created in, for its whole life: bind,
connect, routing and iptables all happen there, whichever namespace the thread
that later uses it is in. So the proxy only has to *be* in the pod's namespace
for the one ``socket()`` call; everything else (options, bind, listen, connect)
happens back home.

The switch uses ``setns(2)`` on the calling thread, not a worker thread. A
worker would cost a thread hop and two context switches per connection, where
a pair of ``setns`` calls costs two syscalls. It is safe because the proxy's
event loop is single-threaded: between the two calls this thread runs nothing
but ``socket()``, so no other code can observe it in the wrong namespace.
``setns(CLONE_NEWNET)`` changes only the calling thread, so other threads
(``to_thread`` workers, the agent's subprocess helpers) never move.

Only the standard library is used (this module sits under the layering rule
``tunnel`` ← identity only); Python 3.11 has no ``os.setns``, so it calls libc.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TypeVar

from tunnel.config import PROXY_MARK as _PROXY_MARK

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
# linux/netfilter_ipv4.h; the socket module does not export it.
SO_ORIGINAL_DST = 80
_SO_MARK = getattr(socket, "SO_MARK", 36)
_IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
_THREAD_NETNS = "/proc/thread-self/ns/net"


class NetnsError(OSError):
    """A namespace could not be opened or entered; the message names its path."""


class NetnsHandle:
    """An open network namespace: holding the fd pins the namespace and makes
    every later use refer to the same one, even if its path is reused."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise NetnsError(
                err.errno, f"cannot open network namespace {path}: {err.strerror}") from err

    @classmethod
    def open(cls, path: str) -> NetnsHandle:
        return cls(path)

    def fileno(self) -> int:
        if self._fd is None:
            raise NetnsError(errno.EBADF, f"network namespace handle {self.path} is closed")
        return self._fd

    @property
    def inode(self) -> int:
        """The namespace's identity: two handles with one inode are one namespace."""
        return os.fstat(self.fileno()).st_ino

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> NetnsHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"fd={self._fd}"
        return f"NetnsHandle({self.path!r}, {state})"


class _Switcher:
    """Moves the calling thread into a namespace and back, one switch at a time."""

    def __init__(self) -> None:
        # Re-entrant so a nested inside() (rare, but legal) cannot deadlock.
        self._lock = threading.RLock()
        self._libc = ctypes.CDLL(None, use_errno=True)
        # The namespace the process started in, opened at first use and kept: the
        # common case (a thread that never moved) then costs no open() per call.
        self._home_fd: int | None = None
        self._home_inode = 0

    def _setns(self, fd: int, what: str) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(err, f"setns into {what}: {os.strerror(err)}")

    def _origin(self) -> tuple[int, bool]:
        """An fd of this thread's current namespace, and whether the caller must close it."""
        if self._home_fd is None:
            self._home_fd = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
            self._home_inode = os.fstat(self._home_fd).st_ino
        if os.stat(_THREAD_NETNS).st_ino == self._home_inode:
            return self._home_fd, False
        # A thread somebody else moved on purpose: send it back where it was,
        # not to the process's home.
        return os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC), True

    def run_inside(self, handle: NetnsHandle, action: Callable[[], T]) -> T:
        """``action()`` with this thread in ``handle``'s namespace, and back. A plain
        call: it runs for every proxied connection, where a generator-based
        context manager costs more than the two setns calls it wraps."""
        with self._lock:
            origin, owned = self._begin(handle)
            try:
                return action()
            finally:
                self._end(origin, owned)

    @contextlib.contextmanager
    def inside(self, handle: NetnsHandle) -> Iterator[None]:
        with self._lock:
            origin, owned = self._begin(handle)
            try:
                yield
            finally:
                self._end(origin, owned)

    def _begin(self, handle: NetnsHandle) -> tuple[int, bool]:
        origin, owned = self._origin()
        try:
            self._setns(handle.fileno(), handle.path)
        except BaseException:
            if owned:
                os.close(origin)
            raise
        return origin, owned

    def _end(self, origin: int, owned: bool) -> None:
        try:
            # If this fails the thread is stranded in the pod's namespace;
            # the error propagates rather than letting it run on there.
            self._setns(origin, "the thread's original network namespace")
        finally:
            if owned:
                os.close(origin)


_switcher = _Switcher()


def inside(handle: NetnsHandle) -> contextlib.AbstractContextManager[None]:
    """Run a *short, non-blocking* block with the calling thread in ``handle``'s
    namespace (for example to open a netlink socket or a /proc/sys/net file)."""
    return _switcher.inside(handle)


def socket_in(handle: NetnsHandle, family: int = socket.AF_INET,
              type: int = socket.SOCK_STREAM, *, proto: int = 0,
              mark: int | None = None, transparent: bool = False) -> socket.socket:
    """A new non-blocking socket that lives in ``handle``'s namespace."""
    sock = _switcher.run_inside(handle, functools.partial(socket.socket, family, type, proto))
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, mark)
        if transparent:
            sock.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise NetnsError(err.errno, f"socket in {handle.path}: {err.strerror}") from err
    return sock


def listen_in(handle: NetnsHandle, port: int, *, host: str = "0.0.0.0",
              mark: int | None = _PROXY_MARK, backlog: int = 1024,
              reuse_port: bool = True) -> socket.socket:
    """A listening TCP socket on ``host:port`` inside ``handle``'s namespace.

    ``SO_REUSEPORT`` lets a restarted proxy bind next to the old one, so the pod
    never sees a refused connection during an upgrade."""
    sock = socket_in(handle, mark=mark)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise NetnsError(
            err.errno, f"listen on {host}:{port} in {handle.path}: {err.strerror}") from err
    return sock


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was going before nat REDIRECT rewrote it."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    # struct sockaddr_in: family in host order, port and address in network order.
    (family,) = struct.unpack_from("=H", raw)
    if family != socket.AF_INET:
        raise OSError(f"SO_ORIGINAL_DST returned address family {family}, not AF_INET")
    port, addr = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntoa(addr), port
