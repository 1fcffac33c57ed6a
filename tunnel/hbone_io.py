"""asyncio adapters for HBONE: sockets and TLS in, `tunnel.hbone` events out.

No protocol logic lives here. A protocol object per TLS connection (on a
`tls_io.TlsTransport`: OpenSSL on the socket, not the loop's TLS) feeds the
sans-IO core, dispatches its events to `HboneStream` objects and writes
what the core queues. An `HboneStream` is a relay `Endpoint`, so `splice`
copies between it and a TCP socket without knowing what either is.

Back-pressure:
* sending: a stream reports `writing_paused` while the core holds more than
  `STREAM_SEND_HIGH_WATER` bytes the peer's windows do not admit yet, or while
  the TLS transport's own buffer is past its high-water mark;
* receiving: a paused stream keeps incoming bytes in a (copied) pending queue
  and does not acknowledge them, so the peer runs out of window after
  `hbone.STREAM_WINDOW` bytes;
* the connection: the TLS transport stops reading while its write queue is past
  the high-water mark (tls_io), and the core GOAWAYs a peer whose frames make us
  queue answers it never reads (`output_drained` tells it when the queue emptied).

Bounds on the server side (issue 10): pending TLS handshakes per listener and
per node (`handshake_limit`), `max_streams` streams per connection (our
SETTINGS) and as many CONNECT handlers in flight; a handler whose stream the
peer resets before it was answered is cancelled, so it runs no policy and opens
no connection to the app.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import traceback
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ClassVar

from h2.errors import ErrorCodes

from identity.certs import PeerIdentityError
from identity.spiffe import Identity
from tunnel import hbone, tasks, tls, tls_io
from tunnel.handshake_limit import HandshakeFailure, HandshakeGate, ListenerSlots, Pending
from tunnel.lograte import RateLimitedLog
from tunnel.relay import (
    ClosedCallback,
    DataCallback,
    SignalCallback,
    _ignore,
    _ignore_closed,
    _ignore_data,
)

if TYPE_CHECKING:
    from tunnel.metrics import ProxyMetrics

log = logging.getLogger("trellis.tunnel.hbone")
# Lines a peer can trigger at will, keyed by fixed reasons. Module-level like
# tasks._running: process-wide, derived, holds no configuration.
_peer_log = RateLimitedLog(log)

# A stream stops reading its TCP side once the windows hold back this much, and
# resumes when all of it went out. Bytes the windows do not admit are copied and
# framed again later, so a sender that keeps reading past the window (1 MiB
# here before issue 6) pays twice per byte exactly when the receiver is the
# bottleneck; the kernel's socket buffer holds them for free.
STREAM_SEND_HIGH_WATER = 64 * 1024
STREAM_SEND_LOW_WATER = 0
# The TLS transport's queue: past this, every stream of the connection pauses.
# It only fills while the socket is full, and each byte queued is a copy.
TLS_WRITE_HIGH_WATER = 256 * 1024
# Past this the transport stops reading until its queue drained. Our own DATA can
# queue up to what the peer's window admits (16 MiB for Trellis, ztunnel and our
# Envoy configuration) past the high-water mark, and two sides that each stop
# reading with data queued would wait on each other for ever: the limit stays
# above that. Answers a peer makes us queue are capped far lower, by the core.
TLS_READ_LIMIT = hbone.CONNECTION_WINDOW + TLS_WRITE_HIGH_WATER + 1024 * 1024


class TunnelError(Exception):
    """Base of the errors an HBONE tunnel reports to its user."""


class PeerIdentityMismatch(TunnelError):
    """The server proved an identity other than the one we meant to reach."""

    def __init__(self, expected: Identity, actual: Identity | None, detail: str = "") -> None:
        super().__init__(f"expected peer {expected}, got {actual or 'no identity'}"
                         + (f": {detail}" if detail else ""))
        self.expected = expected
        self.actual = actual


class StreamRejected(TunnelError):
    """The peer answered the CONNECT with `status` (401 denied, 400 bad request, 503 ...)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"CONNECT rejected with status {status}" if status
                         else "CONNECT answered with a malformed response")
        self.status = status

    @property
    def reason(self) -> str:
        """A metric label from a fixed set: the peer chooses the status, not our labels."""
        return _REJECT_REASONS.get(self.status, "rejected_other")


# What an HBONE server answers in practice (ztunnel, Envoy, Trellis); any other
# status, and a malformed answer (status 0), is "rejected_other".
_REJECT_REASONS = {status: f"rejected_{status}"
                   for status in (400, 401, 403, 404, 500, 502, 503, 504)}


class ResponseTimeout(TunnelError):
    """The peer accepted the stream but sent no final answer within the bound."""


class TunnelClosed(TunnelError):
    """The connection or stream ended before the tunnel opened; `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------ streams

class HboneStream:
    """One CONNECT tunnel as a relay `Endpoint`."""

    def __init__(self, connection: _HboneConnection, stream_id: int) -> None:
        self.on_data: DataCallback = _ignore_data
        self.on_eof: SignalCallback = _ignore
        self.on_closed: ClosedCallback = _ignore_closed
        self.on_write_paused: SignalCallback = _ignore
        self.on_write_resumed: SignalCallback = _ignore
        self.bytes_received = 0
        self.bytes_sent = 0
        self.stream_id = stream_id
        self._conn = connection
        self._proto = connection._proto
        self._pending: deque[bytes] = deque()
        self._reading_paused = True      # until spliced
        self._buffer_paused = False      # the core holds too much unsent data
        self._remote_ended = False
        self._eof_delivered = False
        self._local_ended = False
        self._closed = False
        self._closed_error: str | None = None

    @property
    def writing_paused(self) -> bool:
        return self._buffer_paused or self._conn._writing_paused

    @property
    def closed_error(self) -> str | None:
        return self._closed_error

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def connection(self) -> _HboneConnection:
        return self._conn

    def write(self, data: bytes | memoryview) -> None:
        if self._closed or self._local_ended:
            return  # the stream is gone; on_closed already told (or will tell) why
        self.bytes_sent += len(data)
        try:
            self._proto.send_data(self.stream_id, data)
        except hbone.LocalProtocolError:
            return  # reset by the peer in this very batch; its event follows
        self._conn._flush()
        if not self._buffer_paused and \
                self._proto.buffered(self.stream_id) >= STREAM_SEND_HIGH_WATER:
            was_paused = self.writing_paused
            self._buffer_paused = True
            self._conn._buffer_paused_streams[self.stream_id] = self
            if not was_paused:
                self.on_write_paused()

    def write_eof(self) -> None:
        if self._closed or self._local_ended:
            return
        self._local_ended = True
        try:
            self._proto.end_stream(self.stream_id)
        except hbone.LocalProtocolError:
            return
        self._conn._flush()
        self._maybe_finished()

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if not self._reading_paused or self._closed:
            return
        self._reading_paused = False
        self._drain_pending()
        self._conn._flush()

    def abort(self) -> None:
        """Reset with CONNECT_ERROR (RFC 9113 §8.5: the proxied TCP connection failed)."""
        self.reset(ErrorCodes.CONNECT_ERROR, "aborted")

    def reset(self, error_code: int, reason: str) -> None:
        if self._closed:
            return
        self._proto.reset_stream(self.stream_id, error_code)
        self._conn._flush()
        self._finish(reason)

    def close(self) -> None:
        """Done with the stream: a no-op once both directions ended, otherwise a reset
        (HTTP/2 has no way to stop the peer's sending but RST_STREAM)."""
        if self._closed:
            return
        if self._eof_delivered and self._local_ended:
            self._finish(None)
        else:
            self.reset(ErrorCodes.CANCEL, "closed")

    # called by the connection

    def _data(self, data: memoryview) -> None:
        if self._reading_paused or self._pending:
            # Copy: a view would pin the whole TLS read it points into.
            self._pending.append(bytes(data))
            return
        n = len(data)
        self.bytes_received += n
        self.on_data(data)
        self._proto.acknowledge_received(self.stream_id, n)

    def _ended(self) -> None:
        self._remote_ended = True
        if not self._pending and not self._reading_paused:
            self._deliver_eof()

    def _drain_pending(self) -> None:
        pending = self._pending
        while pending and not self._reading_paused:
            data = pending.popleft()
            n = len(data)
            self.bytes_received += n
            self.on_data(data)
            self._proto.acknowledge_received(self.stream_id, n)
        if not pending and not self._reading_paused and self._remote_ended:
            self._deliver_eof()

    def _deliver_eof(self) -> None:
        if self._eof_delivered or self._closed:
            return
        self._eof_delivered = True
        self.on_eof()
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if self._eof_delivered and self._local_ended:
            self._finish(None)

    def _send_progress(self) -> bool:
        """After window updates: resume writers once the core's buffer drained; True if so."""
        if self._closed or self._proto.buffered(self.stream_id) > STREAM_SEND_LOW_WATER:
            return self._closed
        self._buffer_paused = False
        if not self._conn._writing_paused:
            self.on_write_resumed()
        return True

    def _finish(self, error: str | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._closed_error = error
        self._pending.clear()
        self._conn._stream_finished(self)
        self.on_closed(error)


# --------------------------------------------------------------- connections

class _HboneConnection:
    """What client and server connections share: the TLS transport and event dispatch.

    A `tls_io.TlsProtocol`: the transport is OpenSSL on the socket (see tls_io
    for why not the loop's TLS transport)."""

    _proto: hbone.HboneClientProtocol | hbone.HboneServerProtocol

    def __init__(self, trust_domain: str) -> None:
        self._trust_domain = trust_domain
        self._transport: tls_io.TlsTransport | None = None
        self._streams: dict[int, HboneStream] = {}
        self._buffer_paused_streams: dict[int, HboneStream] = {}
        self._writing_paused = False
        self._peer_identity: Identity | None = None
        self._setup_error: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        self._close_reason: str | None = None
        self.idle_since = self._loop.time()
        self._idle = True
        # Set by a pool: called when the last stream of this connection finished.
        self.on_idle: Callable[[], None] | None = None

    # tls_io.TlsProtocol

    def connection_made(self, transport: tls_io.TlsTransport) -> None:
        self._transport = transport
        transport.set_write_buffer_limits(high=TLS_WRITE_HIGH_WATER)
        transport.set_read_limit(TLS_READ_LIMIT)
        try:
            self._check_peer(transport.get_extra_info("ssl_object"))
        except (PeerIdentityError, PeerIdentityMismatch, TunnelClosed) as exc:
            self._setup_error = exc
            self._log_refused(exc)
            transport.abort()
            return
        transport.write(self._proto.initiate())

    def data_received(self, data: memoryview) -> None:
        transport = self._transport
        if transport is not None and not transport.get_write_buffer_size():
            self._proto.output_drained()
        try:
            events = self._proto.receive_data(data)
        except hbone.RemoteProtocolError as exc:
            self._peer_fault(exc)
            self._flush()
            self._shut(f"protocol error: {exc}", graceful=True)
            return
        except Exception as exc:
            # Only the core's own errors may leave receive_data; anything else is
            # our bug. Fail closed: drop this connection, keep the traceback (at a
            # bounded rate: a peer that found the bug could repeat it at will).
            _peer_log.log(logging.ERROR, "internal_error",
                          f"HBONE core failed on a peer's input; connection closed: {exc!r}",
                          {"peer": str(self.peer_identity),
                           "traceback": traceback.format_exc()})
            self._shut("internal error", graceful=False)
            return
        handlers = self._HANDLERS
        for event in events:
            handlers[type(event)](self, event)
        if self._buffer_paused_streams:
            for stream in list(self._buffer_paused_streams.values()):
                if stream._send_progress():
                    del self._buffer_paused_streams[stream.stream_id]
        self._flush()
        self._after_events()

    def eof_received(self) -> bool:
        return False  # TLS has no half-close; let the transport close

    def connection_lost(self, exc: BaseException | None) -> None:
        reason = self._close_reason or (f"connection lost: {exc}" if exc else "connection closed")
        self._close_reason = reason
        for stream in list(self._streams.values()):
            stream._finish(reason)
        if not self._closed.done():
            self._closed.set_result(None)
        self._connection_lost(reason)

    def pause_writing(self) -> None:
        self._writing_paused = True
        for stream in list(self._streams.values()):
            if not stream._buffer_paused:
                stream.on_write_paused()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._proto.output_drained()
        for stream in list(self._streams.values()):
            if not stream._buffer_paused:
                stream.on_write_resumed()

    # shared API

    @property
    def peer_identity(self) -> Identity | None:
        return self._peer_identity

    @property
    def local_address(self) -> tuple[str, int] | None:
        return self._transport.get_extra_info("sockname") if self._transport else None

    @property
    def peer_address(self) -> tuple[str, int] | None:
        return self._transport.get_extra_info("peername") if self._transport else None

    @property
    def active_streams(self) -> int:
        """Streams still open in the core (including ones still flushing their tail)."""
        return self._proto.open_streams

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    def close(self) -> None:
        """GOAWAY, then close the TLS connection; open streams end with an error."""
        self._shut("closed locally", graceful=True)

    def abort(self) -> None:
        """Drop the TCP connection at once, without a GOAWAY."""
        self._shut("aborted locally", graceful=False)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    # internals

    def _flush(self) -> None:
        data = self._proto.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _shut(self, reason: str, *, graceful: bool) -> None:
        if self._close_reason is None:
            self._close_reason = reason
        if self._transport is None or self._transport.is_closing():
            return
        if graceful:
            self._proto.close_connection()
            self._flush()
            self._transport.close()
        else:
            self._transport.abort()

    def _stream_finished(self, stream: HboneStream) -> None:
        self._streams.pop(stream.stream_id, None)
        self._buffer_paused_streams.pop(stream.stream_id, None)
        self._check_idle()

    def _stream_started(self, stream: HboneStream) -> None:
        self._streams[stream.stream_id] = stream
        self._idle = False

    def _after_events(self) -> None:
        self._check_idle()

    def _check_idle(self) -> None:
        """On the busy → idle transition: close after a GOAWAY, else tell the pool."""
        if self._idle or self._proto.open_streams or self._streams:
            return
        self._idle = True
        self.idle_since = self._loop.time()
        if self._proto.goaway_received or self._proto.is_terminated:
            self._shut("peer sent GOAWAY", graceful=True)
        elif self.on_idle is not None:
            self.on_idle()

    def _on_data(self, event: hbone.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._data(event.data)
        else:
            self._proto.acknowledge_received(event.stream_id, event.flow_controlled_length)

    def _on_ended(self, event: hbone.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._ended()

    def _on_reset(self, event: hbone.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._finish(f"stream reset by peer: {_code_name(event.error_code)}")

    def _on_terminated(self, event: hbone.ConnectionTerminated) -> None:
        detail = f"GOAWAY {_code_name(event.error_code)} {event.reason}".strip()
        if event.error_code != ErrorCodes.NO_ERROR:
            self._shut(detail, graceful=False)
        elif self._close_reason is None:
            self._close_reason = detail

    def _ignore_event(self, event: hbone.Event) -> None:
        pass

    _HANDLERS: ClassVar[dict[type, Callable[..., None]]] = {
        hbone.DataReceived: _on_data,
        hbone.StreamEnded: _on_ended,
        hbone.StreamReset: _on_reset,
        hbone.ConnectionTerminated: _on_terminated,
    }

    def _peer_fault(self, exc: hbone.RemoteProtocolError) -> None:
        _peer_log.log(logging.WARNING, ("peer_fault", exc.fault),
                      f"HBONE peer broke the protocol: {exc}",
                      {"peer": str(self.peer_identity), "reason": exc.fault.value})

    def _check_peer(self, ssl_object: ssl.SSLSocket | None) -> None:
        if ssl_object is None:
            raise TunnelClosed("HBONE needs TLS")
        if ssl_object.selected_alpn_protocol() != tls.ALPN:
            raise TunnelClosed(f"peer did not negotiate ALPN {tls.ALPN!r}")
        self._peer_identity = tls.peer_identity(ssl_object, self._trust_domain)

    def _log_refused(self, exc: BaseException) -> None:
        pass

    def _connection_lost(self, reason: str) -> None:
        pass


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


class HboneConnection(_HboneConnection):
    """Client side: one TLS + HTTP/2 connection to a peer's port 15008, many streams."""

    _proto: hbone.HboneClientProtocol

    def __init__(self, trust_domain: str, expected_peer: Identity, *,
                 response_timeout: float = 5.0) -> None:
        super().__init__(trust_domain)
        self._proto = hbone.HboneClientProtocol()
        self._expected_peer = expected_peer
        self._response_timeout = response_timeout
        self._ready = self._loop.create_future()
        self._opening: dict[int, asyncio.Future[None]] = {}
        self._slot_waiters: deque[asyncio.Future[None]] = deque()

    @classmethod
    async def connect(cls, sock: socket.socket, address: tuple[str, int],
                      ssl_context: ssl.SSLContext, expected_peer: Identity, *,
                      trust_domain: str, connect_timeout: float) -> HboneConnection:
        """Connect the caller's unconnected non-blocking `sock` (created in the source pod's
        namespace, marked) and speak HBONE over it.

        Returns once TLS is up, the server proved `expected_peer` and its SETTINGS
        arrived (so it accepted our certificate). `sock` is closed on failure.
        `connect_timeout` also bounds each stream's wait for the CONNECT's answer.
        Raises PeerIdentityMismatch, TunnelClosed, ssl.SSLError, OSError or TimeoutError.
        """
        loop = asyncio.get_running_loop()
        conn: HboneConnection | None = None
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.sock_connect(sock, address)
                ssl_sock = await tls_io.handshake(sock, ssl_context, server_side=False,
                                                  timeout=connect_timeout)
                conn = cls(trust_domain, expected_peer, response_timeout=connect_timeout)
                tls_io.TlsTransport(loop, ssl_sock, conn)
                if conn._setup_error is not None:
                    raise conn._setup_error
                await asyncio.shield(conn._ready)
        except BaseException:
            if conn is not None:  # the transport owns the socket now
                conn._shut("connect failed", graceful=False)
            else:
                sock.close()  # a no-op once the handshake took it over (and closed it)
            raise
        return conn

    @property
    def available_streams(self) -> int:
        if not self.is_usable:
            return 0
        return max(0, self._proto.available_streams - len(self._slot_waiters))

    @property
    def is_usable(self) -> bool:
        return (self._ready.done() and not self._ready.cancelled()
                and self._ready.exception() is None and self._close_reason is None
                and not self._proto.goaway_received and not self._proto.is_terminated
                and self._transport is not None and not self._transport.is_closing())

    def limit_streams(self, max_streams: int) -> None:
        """Carry at most `max_streams` streams at once (the pool's per-connection cap)."""
        self._proto.limit_streams(max_streams)

    async def open_stream(self, authority: str, headers: list[tuple[str, str]]) -> HboneStream:
        """CONNECT to `authority`; returns the open tunnel or raises StreamRejected(status) /
        TunnelClosed / ResponseTimeout (no final answer within the connect timeout; 1xx
        answers do not end the wait). Waits for a free slot if all are in use."""
        while self._proto.available_streams <= 0:
            if not self.is_usable:
                raise TunnelClosed(self._close_reason or "connection is not usable")
            waiter = self._loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)
        if not self.is_usable:
            raise TunnelClosed(self._close_reason or "connection is not usable")
        try:
            stream_id = self._proto.open_stream(authority, headers)
        except hbone.LocalProtocolError as exc:  # e.g. a GOAWAY arrived meanwhile
            raise TunnelClosed(f"cannot open a stream: {exc}") from exc
        stream = HboneStream(self, stream_id)
        self._stream_started(stream)
        opened = self._loop.create_future()
        self._opening[stream_id] = opened
        self._flush()
        try:
            async with asyncio.timeout(self._response_timeout):
                await opened
        except TimeoutError:
            stream.reset(ErrorCodes.CANCEL, "no answer to CONNECT")
            raise ResponseTimeout(f"no answer to CONNECT {authority} within "
                                  f"{self._response_timeout:g} s") from None
        except asyncio.CancelledError:
            stream.reset(ErrorCodes.CANCEL, "cancelled while opening")
            raise
        finally:
            self._opening.pop(stream_id, None)
        return stream

    # events

    def _on_accepted(self, event: hbone.StreamAccepted) -> None:
        opened = self._opening.get(event.stream_id)
        if opened is not None and not opened.done():
            opened.set_result(None)

    def _on_rejected(self, event: hbone.StreamRejected) -> None:
        self._fail_opening(event.stream_id, StreamRejected(event.status))
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._finish(f"rejected with status {event.status}")

    def _fail_opening(self, stream_id: int, exc: TunnelError) -> None:
        opened = self._opening.get(stream_id)
        if opened is not None and not opened.done():
            opened.set_exception(exc)

    _HANDLERS: ClassVar[dict[type, Callable[..., None]]] = {
        **_HboneConnection._HANDLERS,
        hbone.StreamAccepted: _on_accepted,
        hbone.StreamRejected: _on_rejected,
    }

    def data_received(self, data: memoryview) -> None:
        super().data_received(data)
        if not self._ready.done() and self._proto.peer_settings_received:
            self._ready.set_result(None)

    def _stream_finished(self, stream: HboneStream) -> None:
        super()._stream_finished(stream)
        self._fail_opening(stream.stream_id, TunnelClosed(stream.closed_error or "stream closed"))
        self._wake_slot_waiter()

    def _check_idle(self) -> None:
        super()._check_idle()
        self._wake_slot_waiter()

    def _wake_slot_waiter(self) -> None:
        if self._slot_waiters and (self._proto.available_streams > 0 or not self.is_usable):
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _check_peer(self, ssl_object: ssl.SSLSocket | None) -> None:
        try:
            super()._check_peer(ssl_object)
        except PeerIdentityError as exc:
            raise PeerIdentityMismatch(self._expected_peer, None, str(exc)) from exc
        if self._peer_identity != self._expected_peer:
            raise PeerIdentityMismatch(self._expected_peer, self._peer_identity)

    def _connection_lost(self, reason: str) -> None:
        if not self._ready.done():
            self._ready.set_exception(TunnelClosed(reason))
            self._ready.exception()  # retrieved: connect() may be gone already
        for opened in self._opening.values():
            if not opened.done():
                opened.set_exception(TunnelClosed(reason))
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


# ------------------------------------------------------------------- server

class InboundRequest:
    """One CONNECT received on the HBONE listener, waiting for `accept` or `reject`."""

    def __init__(self, connection: _HboneServerConnection, stream: HboneStream,
                 event: hbone.ConnectRequested) -> None:
        self.authority = event.authority
        self.address = event.address
        self.headers = event.headers
        self.stream_id = event.stream_id
        assert connection.peer_identity is not None
        self.peer_identity: Identity = connection.peer_identity
        self.peer_address = connection.peer_address
        self.local_address = connection.local_address
        self._conn = connection
        self._stream = stream
        self._decided = False

    @property
    def decided(self) -> bool:
        return self._decided

    @property
    def stream_closed(self) -> bool:
        """The peer reset the stream, or the connection is gone."""
        return self._stream.is_closed

    async def accept(self, headers: list[tuple[str, str]] | tuple[()] = ()) -> HboneStream:
        """Answer 200 and return the tunnel (already closed if the client gave up meanwhile)."""
        self._decide()
        if not self._stream.is_closed:
            try:
                self._conn._proto.accept(self.stream_id, headers)
            except hbone.LocalProtocolError as exc:
                self._stream._finish(f"stream gone before accept: {exc}")
            self._conn._flush()
        return self._stream

    def reject(self, status: int) -> None:
        """Answer `status`: 401 not authorized, 400 bad request, 503 upstream unreachable."""
        self._decide()
        if self._stream.is_closed:
            return
        try:
            self._conn._proto.reject(self.stream_id, status)
        except hbone.LocalProtocolError:
            pass
        self._conn._flush()
        self._stream._finish(f"rejected with status {status}")

    def _decide(self) -> None:
        if self._decided:
            raise RuntimeError(f"CONNECT {self.authority} was already answered")
        self._decided = True


InboundHandler = Callable[[InboundRequest], Awaitable[None]]


class _HboneServerConnection(_HboneConnection):
    _proto: hbone.HboneServerProtocol

    def __init__(self, handler: InboundHandler, trust_domain: str, gate: HandshakeGate, *,
                 max_streams: int, metrics: ProxyMetrics | None) -> None:
        super().__init__(trust_domain)
        self._proto = hbone.HboneServerProtocol(max_streams=max_streams)
        self._handler = handler
        self._gate = gate
        self._metrics = metrics
        # CONNECT handlers in flight, by stream id. h2 frees a stream's slot when the
        # stream closes, but its handler may still be running: the bound is here.
        # Twice the stream limit: the peer's pool reuses a slot as soon as it sees the
        # stream end, while our handler may still be finishing; at exactly the limit
        # that new stream was refused (REFUSED_STREAM) and the app's connection reset
        # (seen in the rotation-under-load test). h2 still caps open streams at
        # max_streams, so only finishing handlers use the slack.
        self._max_handlers = 2 * max_streams
        self._handlers: dict[int, tuple[asyncio.Task[None], InboundRequest]] = {}

    @property
    def handlers_in_flight(self) -> int:
        return len(self._handlers)

    def drain(self) -> None:
        """Graceful GOAWAY: the streams in flight finish, the peer opens new ones
        elsewhere (its pool takes another connection, e.g. to a newer proxy)."""
        self._proto.drain()
        self._flush()

    def _on_connect(self, event: hbone.ConnectRequested) -> None:
        stream_id = event.stream_id
        if len(self._handlers) >= self._max_handlers:
            self._proto.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            if self._metrics is not None:
                self._metrics.hbone_streams_refused.labels("handler_limit").inc()
            _peer_log.log(logging.WARNING, "handler_limit",
                          "HBONE stream refused: all CONNECT handlers of the connection busy",
                          {"peer": str(self.peer_identity), "limit": self._max_handlers})
            return
        stream = HboneStream(self, stream_id)
        self._stream_started(stream)
        request = InboundRequest(self, stream, event)
        task = tasks.spawn(self._handle(request),
                           name=f"hbone-inbound {self.peer_identity} -> {event.authority}")
        self._handlers[stream_id] = (task, request)
        task.add_done_callback(lambda _: self._handlers.pop(stream_id, None))

    async def _handle(self, request: InboundRequest) -> None:
        try:
            await self._handler(request)
        finally:
            if not request.decided and not request.stream_closed:
                log.warning("HBONE handler left CONNECT %s unanswered; rejecting with 503",
                            request.authority)
                request.reject(503)

    def _stream_finished(self, stream: HboneStream) -> None:
        super()._stream_finished(stream)
        entry = self._handlers.get(stream.stream_id)
        if entry is not None and not entry[1].decided:
            # Reset (or the connection lost) before we answered: stop the handler,
            # so a cancelled stream runs no policy and opens nothing to the app.
            # A task that never started never runs at all.
            entry[0].cancel()

    def _peer_fault(self, exc: hbone.RemoteProtocolError) -> None:
        super()._peer_fault(exc)
        if self._metrics is not None:
            self._metrics.hbone_peer_errors.labels(exc.fault.value).inc()

    def _on_refused(self, event: hbone.RequestRefused) -> None:
        _peer_log.log(logging.INFO, "request_refused",
                      f"refused HBONE request from {self.peer_identity}: {event.reason}",
                      {"peer": str(self.peer_identity), "status": event.status})

    _HANDLERS: ClassVar[dict[type, Callable[..., None]]] = {
        **_HboneConnection._HANDLERS,
        hbone.ConnectRequested: _on_connect,
        hbone.RequestRefused: _on_refused,
    }

    def _log_refused(self, exc: BaseException) -> None:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        self._gate.failed(HandshakeFailure.PEER_IDENTITY, peer, str(exc))


class HboneListener:
    """The HBONE accept loop; closes like an `asyncio.Server` (`close`, `wait_closed`).

    Why not ``create_server(ssl=...)``: asyncio and uvloop drop a connection whose
    TLS handshake fails (an expired or untrusted client certificate) without a
    word unless the loop is in debug mode, so an operator never learned why a
    peer was refused. Accepting the socket ourselves and running the handshake
    (`tls_io.handshake`) makes its failure an exception we log with the peer's
    address and OpenSSL's reason. A new TLS connection is rare (pooled), so a
    Python accept loop costs nothing that matters.
    (Added for issue 6, the Envoy interop tests.)
    """

    def __init__(self, sock: socket.socket, ssl_context: ssl.SSLContext,
                 handler: InboundHandler, trust_domain: str, *, gate: HandshakeGate,
                 max_streams: int, metrics: ProxyMetrics | None) -> None:
        self.sockets = (sock,)
        self._sock = sock
        self._ssl_context = ssl_context
        self._handler = handler
        self._trust_domain = trust_domain
        self._gate = gate
        self._slots: ListenerSlots = gate.listener()
        self._max_streams = max_streams
        self._metrics = metrics
        # Accepted tunnels, so a pod's removal can end them too: closing a
        # listener alone would leave peers' pooled connections to it open.
        self._connections: weakref.WeakSet[_HboneServerConnection] = weakref.WeakSet()
        self._accepting = tasks.spawn(self._accept_loop(),
                                      name=f"hbone-accept {sock.getsockname()}")

    def close(self) -> None:
        self._accepting.cancel()
        self._slots.abort_all()

    def abort_connections(self) -> None:
        """End every tunnel this listener accepted (their streams are reset)."""
        for connection in list(self._connections):
            connection.abort()

    def drain_connections(self) -> None:
        """GOAWAY every tunnel this listener accepted; their open streams carry on."""
        for connection in list(self._connections):
            connection.drain()

    def is_serving(self) -> bool:
        return not self._accepting.done()

    async def wait_closed(self) -> None:
        try:
            await self._accepting
        except asyncio.CancelledError:
            pass

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    conn, peer = await loop.sock_accept(self._sock)
                except OSError as exc:  # EMFILE, ENOBUFS …: keep serving
                    log.warning("HBONE accept failed: %s", exc,
                                extra={"fields": {"error": str(exc)}})
                    await asyncio.sleep(0.1)
                    continue
                pending = self._slots.admit(conn, peer, loop.time())
                if pending is not None:
                    pending.task = tasks.spawn(self._handshake(pending),
                                               name=f"hbone-tls {peer}")
        finally:
            self._sock.close()

    async def _handshake(self, pending: Pending) -> None:
        gate = self._gate
        try:
            ssl_sock = await tls_io.handshake(pending.sock, self._ssl_context, server_side=True,
                                              timeout=gate.limits.timeout_s)
        except (OSError, TimeoutError) as exc:
            pending.release()
            reason = getattr(exc, "verify_message", None) or str(exc) or type(exc).__name__
            gate.failed(_handshake_failure(exc), pending.peer, f"tls handshake: {reason}")
            return
        pending.release()
        connection = _HboneServerConnection(self._handler, self._trust_domain, gate,
                                            max_streams=self._max_streams,
                                            metrics=self._metrics)
        tls_io.TlsTransport(asyncio.get_running_loop(), ssl_sock, connection)
        self._connections.add(connection)


def _handshake_failure(exc: BaseException) -> HandshakeFailure:
    if isinstance(exc, TimeoutError):
        return HandshakeFailure.TIMEOUT
    if isinstance(exc, ssl.SSLCertVerificationError):
        return HandshakeFailure.CERTIFICATE
    if isinstance(exc, ssl.SSLError):
        return HandshakeFailure.TLS
    return HandshakeFailure.NETWORK


async def serve_hbone(sock: socket.socket, ssl_context: ssl.SSLContext, handler: InboundHandler,
                      *, trust_domain: str, gate: HandshakeGate | None = None,
                      max_streams: int = hbone.MAX_CONCURRENT_STREAMS,
                      metrics: ProxyMetrics | None = None) -> HboneListener:
    """Serve HBONE on `sock` (bound, listening, non-blocking). `handler` runs as a task per
    CONNECT and must `accept()` or `reject()` it; one that does neither gets 503.

    A client whose certificate does not verify fails the TLS handshake; one from
    another trust domain is dropped. Both are counted and logged (at a bounded
    rate); neither reaches `handler`. `gate` bounds pending handshakes: share one
    across a node's listeners (without one, the listener gets its own, defaults).
    """
    return HboneListener(sock, ssl_context, handler, trust_domain,
                         gate=gate or HandshakeGate(metrics=metrics), max_streams=max_streams,
                         metrics=metrics)

