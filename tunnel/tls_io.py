"""TLS on the socket itself: OpenSSL reads and writes the descriptor, the loop only polls.

Why not the loop's TLS transport (``create_connection(ssl=...)``)
-----------------------------------------------------------------
uvloop, like asyncio, runs TLS through ``ssl.SSLObject`` and two memory BIOs.
A profile of the HBONE data path (``perf``, issue 6) found up to a quarter of a
proxy's CPU in ``memmove``/``memset`` and page faults, as much as in AES: a sent byte
was copied five times in user space (read buffer → ``bytes``, → HTTP/2 frame,
→ OpenSSL's record, → the memory BIO, which zero-fills before it copies, → a
fresh ``bytes`` for the socket), a received byte four times (into the BIO, into
OpenSSL's record buffer, into a 256 KiB ``bytes`` per 16 KiB record, joined
into one more). Here a non-blocking ``ssl.SSLSocket`` is driven by
``add_reader``/``add_writer``:

* send: ``SSL_write`` takes the caller's whole buffer, cuts full 16 KiB records,
  encrypts each in OpenSSL's own buffer and writes it to the socket;
* receive: ``SSL_read`` reads a record from the socket, decrypts it in place and
  copies it into our reusable receive buffer, which the protocol gets as a view.

This costs syscalls: one ``write`` per 16 KiB record, and two ``read``s per record
(header, then body) where uvloop made one of each per 256 KiB; the copies saved
win anyway (ARCHITECTURE.md, "What a profile of the data path shows"). OpenSSL's
read-ahead would merge the reads (about a tenth less receiver CPU in a loopback
test) but Python has no API for it, only ctypes into ``SSLContext``'s C struct;
not taken. kTLS would save the rest, but the lab's kernel has no ``tls`` ULP.

Back-pressure runs both ways. Past the write high-water mark the protocol is
told to pause writing; past the *read limit* (`set_read_limit`) the transport
also stops reading until the queue has gone out, so a peer that sends and never
reads cannot grow the queue without end (issue 10 measured 34 MiB in 4 s of a
PING/SETTINGS flood, each answered with an ACK). The read limit is not the
high-water mark: two peers that both write bulk data and stop reading while
their own queue is full wait on each other for ever (a full-duplex transfer over
small socket buffers stalled that way in a test). So the protocol sets it above
what its own data can queue (HBONE: what the peer's flow-control window admits),
and caps what the peer can make it *answer* itself (`hbone.MAX_UNSENT_ANSWERS`).

The transport implements the part of ``asyncio.Transport`` that HBONE uses and
calls the usual ``asyncio.Protocol`` methods. ``data_received`` gets a view of
the thread's receive buffer (`tunnel.readbuf`), valid only during the call.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, Protocol

from tunnel import readbuf

# A busy connection reads at most this many buffers per wakeup before yielding.
_READ_ROUNDS_PER_WAKEUP = 4
DEFAULT_HIGH_WATER = 1024 * 1024
# A graceful close that cannot flush (the peer stopped reading) is cut off after this.
CLOSE_FLUSH_TIMEOUT = 10.0
# After close_notify, what the peer still sends is read and dropped for at most this
# long (see `_linger`).
LINGER_TIMEOUT = 2.0

_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)


async def handshake(sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                    timeout: float) -> ssl.SSLSocket:
    """Run the TLS handshake on the connected, non-blocking `sock` (which it takes over).

    Raises ssl.SSLError (ssl.SSLCertVerificationError with ``verify_message``
    when a certificate was refused), OSError or TimeoutError; the socket is
    closed then.
    """
    loop = asyncio.get_running_loop()
    try:
        sock.setblocking(False)
        ssl_sock = context.wrap_socket(sock, server_side=server_side,
                                       do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    ssl_sock.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await _ready(loop, ssl_sock.fileno(), writable=False)
                except ssl.SSLWantWriteError:
                    await _ready(loop, ssl_sock.fileno(), writable=True)
    except BaseException:
        ssl_sock.close()
        raise
    return ssl_sock


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, writable: bool) -> None:
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    (loop.add_writer if writable else loop.add_reader)(fd, wake)
    try:
        await waiter
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)


class TlsProtocol(Protocol):
    """What `TlsTransport` calls: ``asyncio.Protocol``'s methods, with a memoryview."""

    def connection_made(self, transport: TlsTransport) -> None: ...

    def data_received(self, data: memoryview) -> None: ...

    def eof_received(self) -> bool | None: ...

    def connection_lost(self, exc: BaseException | None) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


class TlsTransport:
    """A handshaken non-blocking ``ssl.SSLSocket`` as an asyncio-style transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ssl_sock: ssl.SSLSocket,
                 protocol: TlsProtocol) -> None:
        self._loop = loop
        self._ssl = ssl_sock
        self._fd = ssl_sock.fileno()
        self._protocol = protocol
        self._extra: dict[str, Any] = {
            "ssl_object": ssl_sock, "socket": ssl_sock,
            "peername": ssl_sock.getpeername(), "sockname": ssl_sock.getsockname(),
        }
        self._out = bytearray()       # plaintext not yet accepted by SSL_write
        self._waiting_writable = False
        self._high_water = DEFAULT_HIGH_WATER
        self._low_water = DEFAULT_HIGH_WATER // 4
        self._protocol_paused = False
        self._reading = True          # the reader is registered with the loop
        self._read_wanted = True      # not paused by pause_reading()
        self._read_limit: int | None = None  # None: reading never waits for writes
        self._read_held = False       # stopped while the write queue is past the read limit
        self._closing = False         # close() called: flush, then shut down
        self._closed = False          # the descriptor is gone
        self._lingering = False       # close_notify sent; draining the socket
        self._close_timer: asyncio.TimerHandle | None = None
        # The protocol batches its answers; a small record should not wait for more.
        ssl_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        protocol.connection_made(self)
        if not self._closed:
            loop.add_reader(self._fd, self._read_ready)

    # ------------------------------------------------- asyncio.Transport part

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high_water = DEFAULT_HIGH_WATER if high is None else high
        self._low_water = self._high_water // 4 if low is None else low

    def get_write_buffer_size(self) -> int:
        return len(self._out)

    def set_read_limit(self, limit: int | None) -> None:
        """Stop reading while more than `limit` bytes wait to be written (None: never)."""
        self._read_limit = limit

    @property
    def reading_held(self) -> bool:
        """Reading stopped because the peer does not read what we write."""
        return self._read_held

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data`, or queue a copy of what the socket does not take now. The caller
        may reuse its buffer as soon as this returns."""
        if self.is_closing() or not data:
            return
        if self._out:
            self._out += data
        elif not self._send(data):
            # SSL_write may already have sent records from `data`; its retry must
            # see the same bytes, and OpenSSL accepts them from a new address.
            self._out = bytearray(data)
        queued = len(self._out)
        if queued > self._high_water and not self._protocol_paused:
            self._protocol_paused = True
            self._protocol.pause_writing()
        if self._read_limit is not None and queued > self._read_limit and not self._read_held:
            self._read_held = True
            self._stop_reading()

    def pause_reading(self) -> None:
        self._read_wanted = False
        self._stop_reading()

    def resume_reading(self) -> None:
        self._read_wanted = True
        if not self._read_held:
            self._start_reading()

    def close(self) -> None:
        """Flush what is queued, send close_notify, close. Reading stops now."""
        if self.is_closing():
            return
        self._closing = True
        self._stop_reading()
        if self._out:
            self._close_timer = self._loop.call_later(CLOSE_FLUSH_TIMEOUT, self.abort)
        else:
            self._shutdown()

    def abort(self) -> None:
        """Close at once; queued bytes are dropped."""
        self._teardown(None)

    # ---------------------------------------------------------------- send

    def _send(self, data: bytes | bytearray | memoryview) -> bool:
        """SSL_write all of `data`; False if the socket is full (wait, then retry).

        SSL_write either takes the whole buffer or, when the socket fills, keeps
        the records it already wrote and wants the same bytes again (a longer
        buffer is fine: the retry continues where it stopped). So `_out` only
        grows until one call takes all of it.
        """
        try:
            self._ssl.write(data)
        except _AGAIN:
            if not self._waiting_writable:
                self._waiting_writable = True
                self._loop.add_writer(self._fd, self._write_ready)
            return False
        except OSError as exc:  # ssl.SSLError is one
            self._teardown(exc)
        return True

    def _write_ready(self) -> None:
        if not self._send(self._out) or self._closed:
            return
        self._out = bytearray()
        self._waiting_writable = False
        self._loop.remove_writer(self._fd)
        if self._read_held:
            self._read_held = False
            if self._read_wanted:
                self._start_reading()
        if self._protocol_paused:
            self._protocol_paused = False
            self._protocol.resume_writing()
        if self._closing:
            self._shutdown()

    # ------------------------------------------------------------- receive

    def _read_ready(self) -> None:
        for _ in range(_READ_ROUNDS_PER_WAKEUP):
            if self._closed or not self._reading:
                return
            buffer = readbuf.take()
            view = memoryview(buffer)
            size = len(buffer)
            filled = 0
            failure: OSError | None = None
            eof = False
            try:
                while filled < size:
                    n = self._ssl.recv_into(view[filled:])
                    if not n:
                        eof = True
                        break
                    filled += n
            except _AGAIN:
                pass
            except OSError as exc:
                failure = exc
            if filled:
                self._protocol.data_received(view[:filled])
            del view
            if failure is not None:
                self._teardown(failure)
                return
            if eof:
                self._eof()
                return
            if filled < size:
                return  # drained; the poller calls again
        if not self._closed and self._reading:
            # Bounded work per wakeup. A record OpenSSL already decrypted is not
            # visible to the poller, so come back for it ourselves.
            self._loop.call_soon(self._read_ready)

    def _eof(self) -> None:
        # TLS has no half-close (HTTP/2 carries it as END_STREAM): an EOF, with or
        # without close_notify, ends the connection.
        self._protocol.eof_received()
        self._teardown(None)

    # ------------------------------------------------------------- closing

    def _start_reading(self) -> None:
        if not self._reading and not self.is_closing():
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)
            self._loop.call_soon(self._read_ready)  # OpenSSL may hold a decrypted record

    def _stop_reading(self) -> None:
        if self._reading and not self._closed:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _shutdown(self) -> None:
        try:
            self._ssl.unwrap()  # sends close_notify; we do not wait for the peer's
        except (OSError, ValueError):
            pass
        self._linger()

    def _linger(self) -> None:
        """Half-close, then read and drop what the peer still sends until it closes too.

        Closing a socket with unread bytes makes the kernel answer RST and throw
        away what we queued, our GOAWAY and close_notify among them: the peer we
        stopped reading (a flood) would never learn why. So, as nginx's lingering
        close: FIN after our last byte, then drain (below TLS, nothing decrypted)
        until the peer's EOF or LINGER_TIMEOUT. The protocol hears `connection_lost`
        once the descriptor is gone, so a closed connection holds no descriptor.
        """
        try:
            socket.socket.shutdown(self._ssl, socket.SHUT_WR)
        except OSError:
            self._teardown(None)
            return
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._lingering = True
        self._loop.add_reader(self._fd, self._discard)
        self._close_timer = self._loop.call_later(LINGER_TIMEOUT, self._teardown, None)

    def _discard(self) -> None:
        scratch = readbuf.take()
        while True:
            try:
                n = socket.socket.recv_into(self._ssl, scratch)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0
            if not n:
                self._teardown(None)
                return

    def _teardown(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._reading or self._lingering:
            self._loop.remove_reader(self._fd)
        if self._waiting_writable:
            self._loop.remove_writer(self._fd)
        self._out = bytearray()
        self._ssl.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)
