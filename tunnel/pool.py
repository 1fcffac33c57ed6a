"""Pooled HBONE connections: a new TCP connection should cost a stream, not a handshake.

Connections are keyed by who talks to whom (ztunnel's key plus the source IP,
because our socket is created inside the source pod and carries its address).
Each holds up to `max_streams_per_connection` streams (100 by default,
ProxyConfig's setting; fewer if the peer says so); past that the pool opens another. Concurrent
callers that find no free slot share one in-flight connect, so a burst of new
TCP connections costs one TLS handshake, not a handshake each. A connection
without streams for `idle_timeout` seconds is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from identity.spiffe import Identity
from tunnel import hbone, tasks
from tunnel.hbone_io import HboneConnection, HboneStream, TunnelClosed

DEFAULT_IDLE_TIMEOUT = 300.0

Connector = Callable[[], Awaitable[HboneConnection]]


@dataclass(frozen=True, slots=True)
class PoolKey:
    src_identity: Identity
    src_ip: str
    dst_identity: Identity
    dst: tuple[str, int]


class HboneConnectionPool:
    def __init__(self, *, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_streams_per_connection: int = hbone.MAX_CONCURRENT_STREAMS) -> None:
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, got {idle_timeout}")
        if max_streams_per_connection < 1:
            raise ValueError("max_streams_per_connection must be >= 1, "
                             f"got {max_streams_per_connection}")
        self._idle_timeout = idle_timeout
        self._max_streams = max_streams_per_connection
        self._connections: dict[PoolKey, list[HboneConnection]] = {}
        self._connecting: dict[PoolKey, asyncio.Task[HboneConnection | BaseException]] = {}
        self._idle_timers: dict[HboneConnection, asyncio.TimerHandle] = {}
        self._closed = False
        self.connects_started = 0

    async def acquire(self, key: PoolKey, connect: Connector) -> HboneConnection:
        """A usable connection for `key` with a free stream slot.

        Open the stream right away (no `await` in between), or use `open_stream`,
        which does both: slots are counted when streams open.
        """
        while True:
            if self._closed:
                raise TunnelClosed("connection pool is closed")
            conn = self._find(key)
            if conn is not None:
                return conn
            pending = self._connecting.get(key)
            if pending is None:
                self.connects_started += 1
                pending = tasks.spawn(self._connect(key, connect), name=f"hbone-connect {key}")
                self._connecting[key] = pending
            try:
                outcome = await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and task is not None and not task.cancelling():
                    raise TunnelClosed("connection pool closed during connect") from None
                raise
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome.available_streams > 0:
                return outcome
            if not outcome.is_usable:
                raise TunnelClosed("new HBONE connection closed before it could be used")
            # Others took every slot of the new connection; look again (maybe connect again).

    async def open_stream(self, key: PoolKey, connect: Connector, authority: str,
                          headers: list[tuple[str, str]]) -> HboneStream:
        """`acquire` and `open_stream` in one step."""
        conn = await self.acquire(key, connect)
        return await conn.open_stream(authority, headers)

    def connection_count(self, key: PoolKey | None = None) -> int:
        if key is not None:
            return len(self._connections.get(key, ()))
        return sum(len(conns) for conns in self._connections.values())

    async def close_all(self, timeout: float = 5.0) -> None:
        """Close every pooled connection (GOAWAY, then TLS close), stop in-flight connects,
        and wait up to `timeout` seconds for the connections to be gone."""
        self._closed = True
        for pending in self._connecting.values():
            pending.cancel()
        closing = [conn for conns in self._connections.values() for conn in conns]
        for conn in closing:
            conn.close()
        self._connections.clear()
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()
        if closing:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(conn.wait_closed() for conn in closing))
            except TimeoutError:
                for conn in closing:
                    conn.abort()

    def abort_from(self, src_ip: str) -> int:
        """Abort every connection dialled from ``src_ip``; return how many.

        A pooled connection's socket lives in the source pod's namespace. Once
        that pod is gone its sockets are dead ends, and a re-created pod with
        the same IP and identity would otherwise be handed one of them.
        """
        doomed = [(key, conn) for key, conns in self._connections.items()
                  if key.src_ip == src_ip for conn in conns]
        for key, conn in doomed:
            self._remove(key, conn)
            conn.abort()
        return len(doomed)

    # internals

    def _find(self, key: PoolKey) -> HboneConnection | None:
        conns = self._connections.get(key)
        if not conns:
            return None
        for conn in conns:
            if conn.available_streams > 0:
                return conn
        return None

    async def _connect(self, key: PoolKey,
                       connect: Connector) -> HboneConnection | BaseException:
        """Run one connect; its failure is *returned*, to be raised in every waiter
        (raising here would also log it as a crashed background task)."""
        try:
            conn = await connect()
        except Exception as exc:
            return exc
        finally:
            self._connecting.pop(key, None)
        if self._closed:
            conn.close()
            return TunnelClosed("connection pool is closed")
        self._add(key, conn)
        return conn

    def _add(self, key: PoolKey, conn: HboneConnection) -> None:
        conn.limit_streams(self._max_streams)
        self._connections.setdefault(key, []).append(conn)
        conn.on_idle = lambda: self._arm_idle_timer(key, conn)
        self._arm_idle_timer(key, conn)
        tasks.spawn(self._forget_when_closed(key, conn), name=f"hbone-pool-watch {key}")

    def _arm_idle_timer(self, key: PoolKey, conn: HboneConnection) -> None:
        old = self._idle_timers.pop(conn, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, conn.idle_since + self._idle_timeout - loop.time())
        self._idle_timers[conn] = loop.call_later(delay, self._expire, key, conn)

    def _expire(self, key: PoolKey, conn: HboneConnection) -> None:
        self._idle_timers.pop(conn, None)
        if conn.active_streams:
            return  # busy again; its next idle moment re-arms the timer
        loop = asyncio.get_running_loop()
        if loop.time() - conn.idle_since < self._idle_timeout:
            self._arm_idle_timer(key, conn)  # was busy in between and idle again since
            return
        self._remove(key, conn)
        conn.close()

    async def _forget_when_closed(self, key: PoolKey, conn: HboneConnection) -> None:
        await conn.wait_closed()
        self._remove(key, conn)

    def _remove(self, key: PoolKey, conn: HboneConnection) -> None:
        conns = self._connections.get(key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._connections[key]
        timer = self._idle_timers.pop(conn, None)
        if timer is not None:
            timer.cancel()
