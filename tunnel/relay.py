"""The byte relay: two endpoints spliced together, with back-pressure and half-close.

This is the hot path. After `splice` wires two endpoints, a chunk read on one
side goes straight to the other side's ``write`` (the read callback *is* the
other endpoint's bound method): no queue, no task, no per-chunk object. A TCP
read lands in the thread's shared receive buffer (`tunnel.readbuf`) and is
handed on as a memoryview of it, consumed before the next read. Back-pressure
is wired the same way: when one side's write buffer passes its high-water mark
it calls the other side's ``pause_reading``, and ``resume_reading`` at the
low-water mark.

Half-close travels end to end: EOF read on one side becomes ``write_eof`` on the
other (TCP FIN ⇄ HTTP/2 END_STREAM), and the splice is finished only when both
directions have ended, or at once when either side fails or is reset.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from tunnel import readbuf

# others.md: uvloop's 64 KiB default stalls a relay at ~5.6 Gbit/s; 256 KiB–1 MiB
# gave the best runs. asyncio resumes at a quarter of it.
WRITE_HIGH_WATER = 1024 * 1024
_LINGER_ZERO = struct.pack("ii", 1, 0)
_NO_BUFFER = bytearray()

DataCallback = Callable[[bytes | memoryview], None]
SignalCallback = Callable[[], None]
ClosedCallback = Callable[[str | None], None]


def _ignore_data(data: bytes | memoryview) -> None:
    pass


def _ignore() -> None:
    pass


def _ignore_closed(error: str | None) -> None:
    pass


class Endpoint(Protocol):
    """One side of a relayed connection (a TCP socket or an HBONE stream).

    The endpoint calls the ``on_*`` callbacks, which `splice` sets:
    ``on_data(chunk)`` for every chunk read, ``on_eof()`` once when the peer
    half-closes, ``on_closed(error)`` once when the endpoint is finished (error
    is None for an orderly end after both directions closed), and
    ``on_write_paused()`` / ``on_write_resumed()`` as its write buffer crosses
    the high / low water marks. An endpoint starts with reading paused.
    """

    on_data: DataCallback
    on_eof: SignalCallback
    on_closed: ClosedCallback
    on_write_paused: SignalCallback
    on_write_resumed: SignalCallback
    bytes_received: int
    bytes_sent: int

    @property
    def writing_paused(self) -> bool: ...

    @property
    def closed_error(self) -> str | None: ...

    @property
    def is_closed(self) -> bool: ...

    def write(self, data: bytes | memoryview) -> None: ...

    def write_eof(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class TcpEndpoint(asyncio.BufferedProtocol):
    """A plain TCP connection as an `Endpoint` (asyncio protocol; use it as the factory).

    `on_connection_made(endpoint)` lets a listener hand every accepted
    connection to its handler. Reading stays paused until `splice` resumes it.
    A buffered protocol: the loop reads into `readbuf`'s buffer, not into a new
    ``bytes`` per read (a profile found those allocations, their copy and their
    page faults at a tenth of the sending proxy's CPU).
    """

    def __init__(self, on_connection_made: Callable[[TcpEndpoint], None] | None = None, *,
                 write_high_water: int = WRITE_HIGH_WATER) -> None:
        # Until a splice wires them, reads are held here (see `_hold`).
        self.on_data: DataCallback = self._hold
        self.on_eof: SignalCallback = self._hold_eof
        self.on_closed: ClosedCallback = _ignore_closed
        self.on_write_paused: SignalCallback = _ignore
        self.on_write_resumed: SignalCallback = _ignore
        self.bytes_received = 0
        self.bytes_sent = 0
        self.transport: asyncio.Transport | None = None
        self._held: list[bytes] = []
        self._read_buffer = _NO_BUFFER  # what get_buffer handed the loop, until read
        self._held_eof = False
        self._on_connection_made = on_connection_made
        self._write_high_water = write_high_water
        self._writing_paused = False
        self._reading_paused = True
        self._eof_received = False
        self._closed = False
        self._closed_error: str | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self._write_high_water)
        transport.pause_reading()
        if self._on_connection_made is not None:
            self._on_connection_made(self)

    def get_buffer(self, sizehint: int) -> bytearray:
        self._read_buffer = buffer = readbuf.take()
        return buffer

    def buffer_updated(self, nbytes: int) -> None:
        # Let go of the buffer: an endpoint that keeps it would keep a replaced
        # (still viewed) buffer alive for as long as the connection idles.
        buffer, self._read_buffer = self._read_buffer, _NO_BUFFER
        self.bytes_received += nbytes
        self.on_data(memoryview(buffer)[:nbytes])

    def eof_received(self) -> bool:
        self._eof_received = True
        self.on_eof()
        return True  # keep the transport open: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if exc is not None:
            self._closed_error = f"{type(exc).__name__}: {exc}"
        self.on_closed(self._closed_error)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.on_write_paused()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self.on_write_resumed()

    # Endpoint

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    @property
    def closed_error(self) -> str | None:
        return self._closed_error

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def peername(self) -> tuple[str, int] | None:
        return self.transport.get_extra_info("peername") if self.transport else None

    @property
    def sockname(self) -> tuple[str, int] | None:
        return self.transport.get_extra_info("sockname") if self.transport else None

    def write(self, data: bytes | memoryview) -> None:
        self.bytes_sent += len(data)
        self._transport().write(data)

    def write_eof(self) -> None:
        transport = self._transport()
        if not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None \
                and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is None:
            return
        was_paused, self._reading_paused = self._reading_paused, False
        if self.on_data != self._hold:  # wired: first hand over what was held
            while self._held and not self._reading_paused:
                self.on_data(self._held.pop(0))
            if self._held or self._reading_paused:
                return
            if self._held_eof:
                self._held_eof = False
                self.on_eof()
                return
        if was_paused and not self.transport.is_closing():
            self.transport.resume_reading()

    def _hold(self, data: bytes | memoryview) -> None:
        """Reads before the splice: both uvloop and asyncio start reading an accepted
        socket *after* connection_made, so our pause there does not stop the first
        read. Keep it (and pause again, effective now) rather than lose it."""
        self._held.append(bytes(data))
        self._reading_paused = False
        self.pause_reading()

    def _hold_eof(self) -> None:
        self._held_eof = True

    def abort(self) -> None:
        """Close at once with a TCP RST: a relay that failed must not look like a clean end
        (a FIN would tell the application its data was complete)."""
        if self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            except OSError:
                pass  # already dead; abort anyway
        self.transport.abort()

    def close(self) -> None:
        """Flush what is buffered, then close (asyncio's close is graceful)."""
        if self.transport is not None:
            self.transport.close()

    def _transport(self) -> asyncio.Transport:
        if self.transport is None:
            raise RuntimeError("TcpEndpoint used before connection_made")
        return self.transport


async def connect_tcp(sock: socket.socket, address: tuple[str, int], *,
                      timeout: float, write_high_water: int = WRITE_HIGH_WATER) -> TcpEndpoint:
    """Connect the caller's unconnected, non-blocking `sock` (it may carry marks, a bound
    source or IP_TRANSPARENT) and wrap it. The socket is closed on failure."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, address)
            _, endpoint = await loop.create_connection(
                functools.partial(TcpEndpoint, write_high_water=write_high_water), sock=sock)
    except BaseException:
        sock.close()  # create_connection is the last step: no transport owns it yet
        raise
    return endpoint


# ------------------------------------------------------------------- splice

@dataclass(frozen=True, slots=True)
class SpliceResult:
    a_to_b: int
    b_to_a: int
    error: str | None


WriteFullCallback = Callable[[Endpoint], None]


class SpliceHandle:
    """A live splice: counters, `close(reason)` from outside, and `wait()` for the result.

    ``on_write_full(endpoint)``, if given, hears each time an endpoint's write buffer
    reaches its high-water mark (the other side's reading is paused then): a count
    of back-pressure, which is rare next to the bytes, so it costs the copy nothing.
    """

    def __init__(self, a: Endpoint, b: Endpoint,
                 on_write_full: WriteFullCallback | None = None) -> None:
        self.a = a
        self.b = b
        self._on_write_full = on_write_full
        self._a_sent_start = b.bytes_sent   # a → b is what b was asked to write
        self._b_sent_start = a.bytes_sent
        self._a_eof = False
        self._b_eof = False
        self._result: SpliceResult | None = None
        self._done = asyncio.get_running_loop().create_future()

    @property
    def a_to_b(self) -> int:
        return self.b.bytes_sent - self._a_sent_start

    @property
    def b_to_a(self) -> int:
        return self.a.bytes_sent - self._b_sent_start

    @property
    def done(self) -> bool:
        return self._result is not None

    def start(self) -> None:
        a, b = self.a, self.b
        a.on_data = b.write
        b.on_data = a.write
        a.on_write_paused = b.pause_reading if self._on_write_full is None else self._a_full
        a.on_write_resumed = b.resume_reading
        b.on_write_paused = a.pause_reading if self._on_write_full is None else self._b_full
        b.on_write_resumed = a.resume_reading
        a.on_eof = self._a_ended
        b.on_eof = self._b_ended
        a.on_closed = self._a_closed
        b.on_closed = self._b_closed
        for endpoint in (a, b):
            if endpoint.is_closed:
                self._finish(endpoint.closed_error or "closed before the splice started")
                return
        if not b.writing_paused:
            a.resume_reading()
        if not self.done and not a.writing_paused:
            b.resume_reading()

    def close(self, reason: str) -> None:
        """End the connection now (e.g. a new policy denies it): both sides are aborted."""
        self._finish(reason)

    async def wait(self) -> SpliceResult:
        return await asyncio.shield(self._done)

    def _a_full(self) -> None:
        assert self._on_write_full is not None  # wired only when given
        self._on_write_full(self.a)
        self.b.pause_reading()

    def _b_full(self) -> None:
        assert self._on_write_full is not None
        self._on_write_full(self.b)
        self.a.pause_reading()

    def _a_ended(self) -> None:
        self._a_eof = True
        self.b.write_eof()
        self._maybe_complete()

    def _b_ended(self) -> None:
        self._b_eof = True
        self.a.write_eof()
        self._maybe_complete()

    def _a_closed(self, error: str | None) -> None:
        self._closed(error, "a")

    def _b_closed(self, error: str | None) -> None:
        self._closed(error, "b")

    def _closed(self, error: str | None, side: str) -> None:
        if self._a_eof and self._b_eof and error is None:
            self._maybe_complete()
        else:
            self._finish(error or f"{side} closed before both directions ended")

    def _maybe_complete(self) -> None:
        if self._a_eof and self._b_eof and self._result is None:
            self._settle(None)
            # Both directions ended: a graceful close flushes what is still buffered.
            self.a.close()
            self.b.close()

    def _finish(self, error: str) -> None:
        if self._result is not None:
            return
        self._settle(error)
        self.a.abort()
        self.b.abort()

    def _settle(self, error: str | None) -> None:
        self._result = SpliceResult(self.a_to_b, self.b_to_a, error)
        for endpoint in (self.a, self.b):
            endpoint.on_data = _ignore_data
            endpoint.on_eof = _ignore
            endpoint.on_closed = _ignore_closed
            endpoint.on_write_paused = _ignore
            endpoint.on_write_resumed = _ignore
        if not self._done.done():
            self._done.set_result(self._result)


def start_splice(a: Endpoint, b: Endpoint,
                 on_write_full: WriteFullCallback | None = None) -> SpliceHandle:
    """Wire `a` and `b` together and start copying; keep the handle to close it later."""
    handle = SpliceHandle(a, b, on_write_full)
    handle.start()
    return handle


async def splice(a: Endpoint, b: Endpoint) -> SpliceResult:
    """Copy bytes both ways until both directions ended or one side failed.

    Cancelling the caller aborts both sides."""
    handle = start_splice(a, b)
    try:
        return await handle.wait()
    except asyncio.CancelledError:
        handle.close("cancelled")
        raise
