"""HBONE, sans-IO: TCP tunnels as HTTP/2 CONNECT streams over one mTLS connection.

Bytes in (`receive_data`) give events out; method calls queue bytes that
`data_to_send` hands to whoever owns the socket. Nothing here imports asyncio or
socket, so every rule below is tested with two protocol objects back to back.

Who does what
-------------
h2 (python-hyper) runs the control plane: preface, SETTINGS, HPACK, HEADERS,
RST_STREAM, WINDOW_UPDATE, PING, GOAWAY and every stream state transition.
DATA frames, the whole byte volume of a tunnel, are handled here:

* Receive. A small splitter walks the frame headers. Control frames go to h2
  unchanged. A DATA payload is handed out as memoryview slices of the bytes the
  caller passed in (no copy, not even across frames that straddle two reads),
  and h2 sees only an *empty* DATA frame carrying the same END_STREAM flag, so
  its stream states stay right and its error rules still apply to DATA on
  idle/closed streams. Measured on h2 4.x: its receive path costs ~36 µs per
  16 KiB frame, a third of it an eager ``repr(frame)`` that hex-encodes every
  payload for a trace log nobody reads.
* Send. DATA frames are written straight into the output buffer, and h2's
  outbound window counters are debited by hand, so h2 still tracks the peer's
  windows (WINDOW_UPDATE, SETTINGS) and `h2.local_flow_control_window` stays
  the one source of truth for how much we may send.
* Inbound flow control is ours alone (h2 never sees a flow-controlled byte):
  the windows reopen only when the consumer calls `acknowledge_received`, which
  is the back-pressure of the receive direction.

Settings (ztunnel's values where they suit a Python receiver)
-------------------------------------------------------------
* 100 concurrent streams per connection by default (`max_streams`, from
  ProxyConfig.max_streams_per_connection); the pool opens another connection
  past that.
* Stream window 4 MiB, connection window 16 MiB (the connection's is raised by
  a WINDOW_UPDATE right after the preface). A consumer that stops reading
  holds at most 4 MiB per stream and 16 MiB per connection.
* Frames: we accept up to 64 KiB and send at most 64 KiB (less if the peer
  says so). ztunnel uses 1 MiB, but h2-based receivers slow down sharply with
  big frames, and our own streaming parser gains nothing from them. Sending
  64 KiB rather than 16 KiB frames measured ~3.7–4.6 against ~3.3–3.6 Gbit/s
  for one loopback stream through both relays in one process.
* Window updates go out once a quarter of a window has been consumed.

Abuse (issue 10)
----------------
* Floods of frames that make us answer (PING, SETTINGS, frames that earn a
  RST_STREAM: CVE-2019-9512/9514/9515): the answers queued while the adapter's
  output has not drained are counted (`output_drained` resets the count); past
  `MAX_UNSENT_ANSWERS` bytes the peer gets GOAWAY ENHANCE_YOUR_CALM.
* Rapid reset (CVE-2023-44487): a stream the peer resets before we answered it,
  or a CONNECT we refuse (400), is *premature*; once more than
  `RAPID_RESET_MIN` are, and they outnumber half the CONNECTs that reached a
  handler, GOAWAY ENHANCE_YOUR_CALM. A refused CONNECT no longer dilutes the ratio.
* A stream reset in the same read as its HEADERS never becomes a request (h2 has
  already dropped it); it counts as premature.

Known h2 limitation: h2 closes its state machine on *any* GOAWAY (h2 issue
#1181), although RFC 9113 §6.8 lets streams at or below the GOAWAY's last
stream ID finish. We put the state machine back to open after a graceful
(NO_ERROR) GOAWAY so those streams complete; the tests pin this behaviour.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

MAX_CONCURRENT_STREAMS = 100
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 64 * 1024
SEND_FRAME_SIZE = 64 * 1024
_DEFAULT_WINDOW = 65_535
_UPDATE_FRACTION = 4
# Answers (ACKs, RST_STREAMs, refusals) the peer made us queue while our output
# has not drained: about 1,000 PING ACKs, Envoy's max_outbound_control_frames.
MAX_UNSENT_ANSWERS = 16 * 1024
# Control frames go to h2 in batches of about this size, so the answer count is
# checked that often (one 256 KiB read of PINGs would otherwise queue 256 KiB of
# ACKs before the first check).
_H2_BATCH = 16 * 1024
# The output buffer: its first allocation, and the size past which it counts as a
# burst's (a busy stream's steady state, one 256 KiB read framed, stays below).
_OUTPUT_MIN = 16 * 1024
_OUTPUT_BURST = 2 * 1024 * 1024
# Rapid reset (CVE-2023-44487): a peer that cancels most of the streams it opens
# before we answer them gets a GOAWAY ENHANCE_YOUR_CALM.
RAPID_RESET_MIN = 200

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# 24-bit length (as 8 + 16 bits), type, flags, 31-bit stream id.
_FRAME_HEADER = struct.Struct(">BHBBL")
_WINDOW_UPDATE = struct.Struct(">BHBBLL")
_DATA, _HEADERS, _PUSH_PROMISE, _WINDOW_UPDATE_TYPE, _CONTINUATION = 0x0, 0x1, 0x5, 0x8, 0x9
_END_STREAM, _END_HEADERS, _PADDED = 0x1, 0x4, 0x8
_STREAM_ID_MASK = 0x7FFF_FFFF


# --------------------------------------------------------------------- errors

class PeerFault(enum.Enum):
    """Why we ended a connection the peer abused; the values are metric labels."""

    PROTOCOL = "protocol_error"    # broke HTTP/2
    FLOOD = "control_flood"        # made us queue answers it never read
    RAPID_RESET = "rapid_reset"    # reset or botched most of the streams it opened


class HboneError(Exception):
    """Base of every HBONE protocol error; `error_code` is the HTTP/2 code for the wire."""

    def __init__(self, message: str, error_code: int = ErrorCodes.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = error_code


class RemoteProtocolError(HboneError):
    """The peer broke HTTP/2 or abused it (`fault`). A GOAWAY is queued: send it, then
    close the connection."""

    def __init__(self, message: str, error_code: int = ErrorCodes.PROTOCOL_ERROR,
                 fault: PeerFault = PeerFault.PROTOCOL) -> None:
        super().__init__(message, error_code)
        self.fault = fault


class LocalProtocolError(HboneError):
    """We asked for something the protocol state forbids (a bug or a race in the caller)."""


class StreamLimitReached(LocalProtocolError):
    """No free stream slot on this connection (`max_streams`, or fewer if the peer says so)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCodes.REFUSED_STREAM)


class _PeerWentAway(Exception):
    """Internal: the peer's error GOAWAY ended the connection in the middle of a read."""


# --------------------------------------------------------------------- events

@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """Server: a valid CONNECT arrived; answer with `accept` or `reject`."""

    stream_id: int
    authority: str
    address: tuple[str, int]
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """Server: a request that is not a valid CONNECT; the protocol already answered `status`."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """Client: the peer answered 2xx; the tunnel is open both ways."""

    stream_id: int
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """Client: the peer answered `status` (not 2xx); the stream is finished. `status` is
    0 for a malformed answer (no three-digit :status, or 101), which we reset."""

    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Tunnel bytes. `data` may be a view into the buffer passed to `receive_data`.

    Call `acknowledge_received(stream_id, flow_controlled_length)` once the
    bytes have been consumed; until then they keep the peer's window closed.
    """

    stream_id: int
    data: memoryview
    flow_controlled_length: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM): TCP's FIN, carried through the tunnel."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone without a clean end: RST_STREAM, or refused by a GOAWAY."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The peer sent GOAWAY. With NO_ERROR, streams up to `last_stream_id` may finish."""

    error_code: int
    reason: str
    last_stream_id: int


Event = (ConnectRequested | RequestRefused | StreamAccepted | StreamRejected | DataReceived
         | StreamEnded | StreamReset | ConnectionTerminated)


def parse_authority(authority: str) -> tuple[str, int]:
    """``ip:port`` or ``[ipv6]:port`` → (normalised ip, port); ValueError names the fault."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not host:
        raise ValueError(f"authority {authority!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"authority {authority!r}: brackets are only for IPv6")
    elif ":" in host:
        raise ValueError(f"authority {authority!r}: an IPv6 address needs brackets")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"authority {authority!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"authority {authority!r}: port must be 1..65535")
    return str(ip), int(port_text)


# ------------------------------------------------------------- output buffer

class _Output:
    """Wire bytes waiting for `data_to_send`, in one buffer kept across flushes.

    A fresh buffer per flush (256 KiB at a time while a stream is busy) cost the
    sending proxy a tenth of its CPU in page faults and growth copies (``perf``,
    issue 6). So frames are written in place into one buffer, allocated at the
    first write (a connection that only carries control frames keeps a few KiB),
    grown for a burst (window updates can release megabytes at once) and given
    back at the first small flush after one.
    """

    __slots__ = ("buffer", "length")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.length = 0

    def reserve(self, n: int) -> int:
        """Make room for `n` more bytes; returns where they start."""
        start = self.length
        end = start + n
        if end > len(self.buffer):
            bigger = bytearray(max(end, 2 * len(self.buffer), _OUTPUT_MIN))
            bigger[:start] = memoryview(self.buffer)[:start]
            self.buffer = bigger
        self.length = end
        return start

    def append(self, data: bytes | bytearray | memoryview) -> None:
        start = self.reserve(len(data))
        self.buffer[start:self.length] = data

    def take(self) -> memoryview:
        view = memoryview(self.buffer)[:self.length]
        if len(self.buffer) > _OUTPUT_BURST and self.length < _OUTPUT_BURST // 4:
            # A small flush after a burst: give the burst's memory back (the view
            # keeps the big buffer alive until the caller is done with it).
            self.buffer = bytearray()
        self.length = 0
        return view


# ------------------------------------------------------------- stream record

class _Stream:
    """What we track per stream beyond h2's state machine."""

    __slots__ = ("delivered", "end_pending", "h2_stream", "head_offset", "id", "local_ended",
                 "pending_update", "receiving", "recv_window", "remote_ended", "send_buffer",
                 "send_buffered", "sending", "state")

    def __init__(self, stream_id: int, state: str, h2_stream: h2.stream.H2Stream) -> None:
        self.id = stream_id
        self.state = state          # "opening" | "requested" | "open" | "rejected"
        self.h2_stream = h2_stream  # h2's stream object, for its outbound window
        self.receiving = False      # DATA from the peer is delivered as events
        self.sending = False        # we may send DATA
        self.local_ended = False
        self.remote_ended = False
        self.recv_window = STREAM_WINDOW
        self.delivered = 0          # handed out in DataReceived, not yet acknowledged
        self.pending_update = 0     # acknowledged, not yet announced in a WINDOW_UPDATE
        self.send_buffer: deque[bytes] = deque()
        self.head_offset = 0        # bytes of send_buffer[0] already sent
        self.send_buffered = 0
        self.end_pending = False    # END_STREAM waits for the send buffer to drain


# ------------------------------------------------------------ the protocol

class _HboneProtocol:
    """What client and server share: framing, flow control, stream bookkeeping."""

    _client_side: ClassVar[bool]

    def __init__(self, *, max_streams: int = MAX_CONCURRENT_STREAMS) -> None:
        if not 1 <= max_streams <= 2**31 - 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        self._max_streams = max_streams
        config = h2.config.H2Configuration(client_side=self._client_side, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config)
        self._h2.local_settings = h2.settings.Settings(client=self._client_side, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
            SettingCodes.ENABLE_PUSH: 0,
        })
        # h2 caches this at construction from the settings we just replaced.
        self._h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self._out = _Output()
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, _Stream] = {}   # streams with buffered send data, in order
        self._events: list[Event] = []
        self._terminated = False
        self._goaway_received = False
        self._peer_settings_received = False
        # Answers the peer's frames made us queue since our output last drained.
        self._unsent_answers = 0
        self._answering = False              # inside _feed_h2: h2's output is an answer
        # Inbound flow control (ours alone, see the module docstring).
        self._recv_window = CONNECTION_WINDOW
        self._conn_pending_update = 0
        # Receive splitter state.
        self._preface_left = 0 if self._client_side else len(_PREFACE)
        self._partial_header = bytearray()
        self._h2_in = bytearray()            # complete control-frame bytes for h2
        self._in_header_block = False        # HEADERS seen, CONTINUATION expected
        self._to_h2_left = 0                 # body bytes of a control frame still to come
        self._data_stream: _Stream | None = None  # current DATA frame's stream, if delivered
        self._data_stream_id = 0
        self._data_left = 0                  # payload bytes of the current DATA frame
        self._skip_left = 0                  # padding still to skip
        self._need_pad_length = False
        self._data_end_stream = False
        self._in_data = False

    # ----------------------------------------------------------- public API

    def initiate(self) -> bytes:
        """Preface (client), SETTINGS and the connection WINDOW_UPDATE: send these first."""
        self._h2.initiate_connection()
        self._pull_h2()
        self._send_window_update(0, CONNECTION_WINDOW - _DEFAULT_WINDOW)
        return bytes(self.data_to_send())

    def data_to_send(self) -> memoryview:
        """Everything queued for the wire. The view is valid until the next call into
        this protocol: send it or copy it before then (the buffer is reused)."""
        return self._out.take()

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the connection; returns the events they caused, in order.

        `DataReceived.data` views slices of `data`: pass immutable bytes, or
        do not reuse the buffer while the events are alive. Raises
        `RemoteProtocolError` (with a GOAWAY queued) when the peer broke HTTP/2.
        """
        if self._terminated:
            return []
        events: list[Event] = []
        self._events = events
        try:
            self._split(memoryview(data))
            self._feed_h2()
        except _PeerWentAway:
            pass  # its GOAWAY (an error) is the last event; the rest of the read is moot
        except h2.exceptions.ProtocolError as exc:
            self._terminated = True
            self._pull_h2()
            raise RemoteProtocolError(f"peer broke HTTP/2: {exc}", exc.error_code) from exc
        finally:
            self._events = []
        return events

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue tunnel bytes; what the peer's windows do not admit yet is buffered here."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.sending or stream.end_pending:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending",
                                     ErrorCodes.STREAM_CLOSED)
        if not data:
            return
        if stream.send_buffered:
            self._buffer(stream, bytes(data))
            return
        view = memoryview(data)
        sent = self._send_frames(stream, view)
        if sent < len(view):
            self._buffer(stream, bytes(view[sent:]))

    def buffered(self, stream_id: int) -> int:
        """Bytes of `stream_id` waiting for flow-control window (the adapter's back-pressure)."""
        stream = self._streams.get(stream_id)
        return stream.send_buffered if stream is not None else 0

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (END_STREAM), after any buffered bytes."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.sending or stream.end_pending:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending",
                                     ErrorCodes.STREAM_CLOSED)
        if stream.send_buffered:
            stream.end_pending = True
        else:
            self._send_end_stream(stream)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort a stream (RST_STREAM); buffered bytes are dropped. A gone stream is a no-op."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            pass
        self._pull_h2()
        self._forget(stream)

    def acknowledge_received(self, stream_id: int, n: int) -> None:
        """The consumer took `n` bytes of `stream_id`: reopen the peer's windows by that much."""
        stream = self._streams.get(stream_id)
        if stream is None or n <= 0:
            return  # a forgotten stream's bytes were returned to the connection already
        n = min(n, stream.delivered)
        stream.delivered -= n
        self._release_connection(n)
        if stream.receiving:
            stream.pending_update += n
            if stream.pending_update >= STREAM_WINDOW // _UPDATE_FRACTION:
                self._send_window_update(stream_id, stream.pending_update)
                stream.recv_window += stream.pending_update
                stream.pending_update = 0

    def output_drained(self) -> None:
        """The adapter's output queue is empty: the peer reads what we answer."""
        self._unsent_answers = 0

    def close_connection(self, error_code: int = ErrorCodes.NO_ERROR, reason: str = "") -> None:
        """Queue a GOAWAY; after sending it the caller closes the transport."""
        if self._terminated:
            return
        self._terminated = True
        self._h2.close_connection(error_code, reason.encode() or None)
        self._pull_h2()

    @property
    def open_streams(self) -> int:
        """Streams we still track (requested, opening or open)."""
        return len(self._streams)

    @property
    def peer_settings_received(self) -> bool:
        """The peer's SETTINGS arrived: it accepted the connection (and our certificate)."""
        return self._peer_settings_received

    @property
    def goaway_received(self) -> bool:
        return self._goaway_received

    @property
    def is_terminated(self) -> bool:
        """A GOAWAY was sent or received with an error; no stream will make progress."""
        return self._terminated

    # ------------------------------------------------------------ receive

    def _split(self, view: memoryview) -> None:
        """Walk frame boundaries: DATA is ours, everything else goes to h2 verbatim."""
        end = len(view)
        pos = 0
        if self._preface_left:
            take = min(self._preface_left, end)
            self._h2_in += view[:take]
            self._preface_left -= take
            pos = take
        while pos < end:
            if self._in_data:
                pos = self._consume_data(view, pos, end)
            elif self._to_h2_left:
                take = min(self._to_h2_left, end - pos)
                self._h2_in += view[pos:pos + take]
                self._to_h2_left -= take
                pos += take
            elif self._partial_header or end - pos < 9:
                take = min(9 - len(self._partial_header), end - pos)
                self._partial_header += view[pos:pos + take]
                pos += take
                if len(self._partial_header) == 9:
                    header = bytes(self._partial_header)
                    self._partial_header.clear()
                    self._begin_frame(header, 0)
            else:
                self._begin_frame(view, pos)
                pos += 9

    def _begin_frame(self, buf: bytes | memoryview, at: int) -> None:
        length_hi, length_lo, frame_type, flags, stream_id = _FRAME_HEADER.unpack_from(buf, at)
        length = (length_hi << 16) | length_lo
        stream_id &= _STREAM_ID_MASK
        if length > MAX_FRAME_SIZE:
            self._feed_h2()  # frames before it first: a GOAWAY among them ends the read
            self._connection_error(ErrorCodes.FRAME_SIZE_ERROR,
                                   f"frame of {length} bytes, limit {MAX_FRAME_SIZE}")
        if frame_type == _DATA and not self._in_header_block:
            self._feed_h2()  # earlier control frames first: they may open or end the stream
            self._begin_data(length, flags, stream_id)
            return
        if len(self._h2_in) >= _H2_BATCH:
            self._feed_h2()  # at a frame boundary: everything in _h2_in is whole frames
        if frame_type in (_HEADERS, _PUSH_PROMISE):
            self._in_header_block = not flags & _END_HEADERS
        elif frame_type == _CONTINUATION and flags & _END_HEADERS:
            self._in_header_block = False
        self._h2_in += buf[at:at + 9]
        self._to_h2_left = length

    def _begin_data(self, length: int, flags: int, stream_id: int) -> None:
        if stream_id == 0:
            self._connection_error(ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")
        if length > self._recv_window:
            self._connection_error(ErrorCodes.FLOW_CONTROL_ERROR,
                                   f"DATA of {length} bytes, connection window {self._recv_window}")
        self._recv_window -= length
        stream = self._streams.get(stream_id)
        if stream is not None and stream.receiving:
            if length > stream.recv_window:
                self._connection_error(
                    ErrorCodes.FLOW_CONTROL_ERROR,
                    f"DATA of {length} bytes, stream window {stream.recv_window}")
            stream.recv_window -= length
            self._data_stream = stream
        else:
            # Nobody will consume these bytes: give the window back now, and let
            # h2 judge an empty DATA frame on this stream (idle → PROTOCOL_ERROR,
            # closed → STREAM_CLOSED, half-closed(local) → fine).
            self._data_stream = None
            self._release_connection(length)
            self._h2_in += _FRAME_HEADER.pack(0, 0, _DATA, flags & _END_STREAM, stream_id)
        self._data_stream_id = stream_id
        self._data_end_stream = bool(flags & _END_STREAM)
        self._need_pad_length = bool(flags & _PADDED)
        if self._need_pad_length and length == 0:
            self._connection_error(ErrorCodes.PROTOCOL_ERROR, "padded DATA frame without payload")
        self._data_left = length
        self._skip_left = 0
        self._in_data = True
        if length == 0:
            self._end_data_frame()

    def _consume_data(self, view: memoryview, pos: int, end: int) -> int:
        stream = self._data_stream
        if self._need_pad_length:
            pad = view[pos]
            pos += 1
            self._data_left -= 1
            self._need_pad_length = False
            if pad > self._data_left:
                self._connection_error(ErrorCodes.PROTOCOL_ERROR, "DATA padding exceeds payload")
            self._data_left -= pad
            self._skip_left = pad
            if stream is not None:  # padding is flow-controlled but nobody consumes it
                stream.delivered += pad + 1
                self.acknowledge_received(stream.id, pad + 1)
        take = min(self._data_left, end - pos)
        if take:
            if stream is not None:
                stream.delivered += take
                self._events.append(DataReceived(stream.id, view[pos:pos + take], take))
            pos += take
            self._data_left -= take
        if not self._data_left:
            skip = min(self._skip_left, end - pos)
            pos += skip
            self._skip_left -= skip
            if not self._skip_left:
                self._end_data_frame()
        return pos

    def _end_data_frame(self) -> None:
        self._in_data = False
        if self._data_end_stream and self._data_stream is not None:
            self._h2_in += _FRAME_HEADER.pack(0, 0, _DATA, _END_STREAM, self._data_stream_id)
        self._data_stream = None

    def _feed_h2(self) -> None:
        if not self._h2_in:
            return
        data = self._h2_in
        self._h2_in = bytearray()
        self._answering = True
        try:
            h2_events = self._h2.receive_data(data)
            self._pull_h2()
            if self._h2_closed():
                self._reopen_for_graceful_goaway(h2_events)
            for event in h2_events:
                if self._terminated:
                    break  # the peer's error GOAWAY: what came after it is moot
                handler = self._H2_HANDLERS.get(type(event))
                if handler is not None:
                    handler(self, event)
        finally:
            self._answering = False
        if self._terminated:
            raise _PeerWentAway
        if self._unsent_answers > MAX_UNSENT_ANSWERS:
            self._connection_error(
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"{self._unsent_answers} bytes of answers queued and not read", PeerFault.FLOOD)

    def _h2_closed(self) -> bool:
        return self._h2.state_machine.state is h2.connection.ConnectionState.CLOSED

    def _reopen_for_graceful_goaway(self, h2_events: list[h2.events.Event]) -> None:
        """h2 takes in a whole batch, GOAWAY included, before we answer the frames that
        came ahead of it: after a graceful GOAWAY those still get their answers (h2
        #1181, as in `_on_goaway`). After an error GOAWAY h2 stays closed, and the
        handlers below answer nothing: the connection is going down."""
        for event in h2_events:
            if isinstance(event, h2.events.ConnectionTerminated) \
                    and event.error_code == ErrorCodes.NO_ERROR:
                self._h2.state_machine.state = (
                    h2.connection.ConnectionState.CLIENT_OPEN if self._client_side
                    else h2.connection.ConnectionState.SERVER_OPEN)
                return

    def _connection_error(self, error_code: int, message: str,
                          fault: PeerFault = PeerFault.PROTOCOL) -> None:
        self._terminated = True
        self._h2.close_connection(error_code, message.encode())
        self._pull_h2()
        raise RemoteProtocolError(message, error_code, fault)

    # ---------------------------------------------------- h2 event handlers

    def _on_data(self, event: h2.events.DataReceived) -> None:
        # h2 only ever sees empty DATA frames (see _begin_data), so nothing to deliver.
        pass

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        stream.remote_ended = True
        stream.receiving = False
        if stream.state != "rejected":
            self._events.append(StreamEnded(stream.id))
        self._maybe_forget(stream)

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        self._forget(stream)
        if stream.state != "rejected":
            self._events.append(StreamReset(stream.id, event.error_code))

    def _on_window_updated(self, event: h2.events.WindowUpdated) -> None:
        if self._h2_closed():
            return
        if event.stream_id:
            stream = self._blocked.get(event.stream_id)
            if stream is not None:
                self._pump(stream)
        else:
            self._pump_all()

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        self._peer_settings_received = True
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings and not self._h2_closed():
            self._pump_all()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self._goaway_received = True
        error_code = event.error_code if event.error_code is not None else 0
        last = event.last_stream_id or 0
        reason = (event.additional_data or b"").decode("utf-8", "replace")
        self._events.append(ConnectionTerminated(error_code, reason, last))
        if error_code != ErrorCodes.NO_ERROR:
            self._terminated = True
            return
        # Graceful: reopen h2's state machine (h2 #1181) so streams <= last finish;
        # streams we opened after `last` were never seen by the peer.
        self._h2.state_machine.state = (h2.connection.ConnectionState.CLIENT_OPEN
                                        if self._client_side
                                        else h2.connection.ConnectionState.SERVER_OPEN)
        for stream in list(self._streams.values()):
            if stream.id > last and self._is_ours(stream.id):
                self._forget(stream)
                self._events.append(StreamReset(stream.id, ErrorCodes.REFUSED_STREAM))

    _H2_HANDLERS: ClassVar[dict[type, Callable[..., None]]] = {}

    # ---------------------------------------------------------------- send

    def _send_frames(self, stream: _Stream, view: memoryview) -> int:
        """Frame as much of `view` as the windows allow; returns the bytes sent."""
        h2_stream = stream.h2_stream
        window = min(self._h2.outbound_flow_control_window, h2_stream.outbound_flow_control_window)
        total = min(window, len(view))
        if total <= 0:
            return 0
        frame_size = min(SEND_FRAME_SIZE, self._h2.max_outbound_frame_size)
        frames = -(-total // frame_size)
        at = self._out.reserve(total + 9 * frames)
        out = self._out.buffer
        pos = 0
        while pos < total:
            size = min(frame_size, total - pos)
            _FRAME_HEADER.pack_into(out, at, size >> 16, size & 0xFFFF, _DATA, 0, stream.id)
            at += 9
            out[at:at + size] = view[pos:pos + size]
            at += size
            pos += size
        # Keep h2's view of the peer's windows exact (we bypassed h2.send_data).
        self._h2.outbound_flow_control_window -= total
        h2_stream.outbound_flow_control_window -= total
        return total

    def _buffer(self, stream: _Stream, data: bytes) -> None:
        stream.send_buffer.append(data)
        stream.send_buffered += len(data)
        self._blocked[stream.id] = stream

    def _pump(self, stream: _Stream) -> None:
        """Send what the windows now admit from `stream`'s buffer."""
        buffer = stream.send_buffer
        while buffer:
            head = buffer[0]
            view = memoryview(head)[stream.head_offset:]
            sent = self._send_frames(stream, view)
            stream.send_buffered -= sent
            if sent < len(view):
                stream.head_offset += sent
                return
            buffer.popleft()
            stream.head_offset = 0
        del self._blocked[stream.id]
        if stream.end_pending:
            stream.end_pending = False
            self._send_end_stream(stream)

    def _pump_all(self) -> None:
        for stream in list(self._blocked.values()):
            if self._h2.outbound_flow_control_window <= 0:
                return
            self._pump(stream)
            if stream.id in self._blocked:
                # Still waiting: to the back of the line, so streams share the window.
                del self._blocked[stream.id]
                self._blocked[stream.id] = stream

    def _send_end_stream(self, stream: _Stream) -> None:
        try:
            self._h2.end_stream(stream.id)
        except h2.exceptions.StreamClosedError:
            self._forget(stream)  # the peer reset it first; nothing left to end
            return
        except h2.exceptions.ProtocolError:
            if self._h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                raise
            # The peer's GOAWAY closed the connection (fuzz_hbone_client): no frame
            # can be sent any more, so there is nothing left to end.
            self._forget(stream)
            return
        self._pull_h2()
        stream.sending = False
        stream.local_ended = True
        self._maybe_forget(stream)

    def _send_window_update(self, stream_id: int, increment: int) -> None:
        at = self._out.reserve(_WINDOW_UPDATE.size)
        _WINDOW_UPDATE.pack_into(self._out.buffer, at, 0, 4, _WINDOW_UPDATE_TYPE, 0, stream_id,
                                 increment)

    def _release_connection(self, n: int) -> None:
        self._conn_pending_update += n
        if self._conn_pending_update >= CONNECTION_WINDOW // _UPDATE_FRACTION:
            self._send_window_update(0, self._conn_pending_update)
            self._recv_window += self._conn_pending_update
            self._conn_pending_update = 0

    # ------------------------------------------------------------ helpers

    def _pull_h2(self) -> None:
        """Move h2's queued frames into our output, keeping their order with our DATA."""
        pending = self._h2.data_to_send()
        if pending:
            self._out.append(pending)
            if self._answering:
                self._unsent_answers += len(pending)

    def _maybe_forget(self, stream: _Stream) -> None:
        if stream.local_ended and stream.remote_ended:
            self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        """Drop a finished stream; bytes handed out but never acknowledged return to the
        connection window, or one dead consumer would shrink it for good."""
        if self._streams.pop(stream.id, None) is None:
            return
        self._blocked.pop(stream.id, None)
        stream.send_buffer.clear()
        stream.send_buffered = 0
        stream.sending = stream.receiving = False
        delivered, stream.delivered = stream.delivered, 0
        self._release_connection(delivered)

    def _is_ours(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self._client_side

    def _h2_call(self, what: str, call: Callable[..., object], *args: object,
                 **kwargs: object) -> None:
        """Run an h2 send method; its refusal becomes a LocalProtocolError."""
        try:
            call(*args, **kwargs)
        except h2.exceptions.ProtocolError as exc:
            raise LocalProtocolError(f"{what}: {exc}", exc.error_code) from exc
        self._pull_h2()


_HboneProtocol._H2_HANDLERS = {
    h2.events.DataReceived: _HboneProtocol._on_data,
    h2.events.StreamEnded: _HboneProtocol._on_stream_ended,
    h2.events.StreamReset: _HboneProtocol._on_stream_reset,
    h2.events.WindowUpdated: _HboneProtocol._on_window_updated,
    h2.events.RemoteSettingsChanged: _HboneProtocol._on_settings,
    h2.events.ConnectionTerminated: _HboneProtocol._on_goaway,
}


def _parse_status(text: str) -> int | None:
    """RFC 9110 §15: exactly three ASCII digits, 100..599 (``str.isdigit`` also takes
    '²' and '٣', which ``int`` then refuses)."""
    if len(text) == 3 and text.isascii() and text.isdigit() and 100 <= int(text) <= 599:
        return int(text)
    return None


def _decode_headers(raw: list[tuple[bytes, bytes]]) -> tuple[dict[str, str],
                                                             tuple[tuple[str, str], ...]]:
    """Split h2's byte headers into pseudo-headers and ordinary ones (latin-1 never fails)."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for name, value in raw:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        if key.startswith(":"):
            pseudo[key] = text
        else:
            regular.append((key, text))
    return pseudo, tuple(regular)


class HboneClientProtocol(_HboneProtocol):
    """The side that opens CONNECT streams (the source node's proxy)."""

    _client_side = True

    @property
    def available_streams(self) -> int:
        """How many more streams may be opened now (0 once the peer sent GOAWAY)."""
        if self._terminated or self._goaway_received:
            return 0
        limit = min(self._max_streams, self._h2.remote_settings.max_concurrent_streams)
        return max(0, limit - self._h2.open_outbound_streams)

    def limit_streams(self, max_streams: int) -> None:
        """Open at most `max_streams` at once from now on (the pool's per-connection cap)."""
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        self._max_streams = max_streams

    def open_stream(self, authority: str, extra_headers: list[tuple[str, str]]) -> int:
        """Send ``CONNECT authority`` (RFC 9113 §8.5: no :scheme, no :path); returns the id."""
        if self.available_streams <= 0:
            raise StreamLimitReached(
                "connection is going away" if self._goaway_received or self._terminated
                else f"all {self.available_streams_limit} stream slots are in use")
        stream_id = self._h2.get_next_available_stream_id()
        headers = [(":method", "CONNECT"), (":authority", authority), *extra_headers]
        self._h2_call("open_stream", self._h2.send_headers, stream_id, headers)
        self._streams[stream_id] = _Stream(stream_id, "opening", self._h2.streams[stream_id])
        return stream_id

    @property
    def available_streams_limit(self) -> int:
        return min(self._max_streams, self._h2.remote_settings.max_concurrent_streams)

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.state != "opening" or self._h2_closed():
            return
        pseudo, headers = _decode_headers(event.headers or [])
        status = _parse_status(pseudo.get(":status", ""))
        if status is None:
            self._malformed_response(stream)
            return
        if 200 <= status < 300:
            stream.state = "open"
            stream.receiving = stream.sending = True
            self._events.append(StreamAccepted(stream.id, headers))
            return
        stream.state = "rejected"
        self._events.append(StreamRejected(stream.id, status))
        # Close our half too, so the stream frees its slot on both sides.
        self._send_end_stream(stream)

    def _on_informational(self, event: h2.events.InformationalResponseReceived) -> None:
        """RFC 9110 §15.2: a 1xx is interim and the final answer follows (the adapter
        bounds the wait). RFC 9113 §8.6: HTTP/2 has no 101, so that one is malformed."""
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.state != "opening" or self._h2_closed():
            return
        pseudo, _ = _decode_headers(event.headers or [])
        status = _parse_status(pseudo.get(":status", ""))
        if status is None or status == 101:
            self._malformed_response(stream)

    def _malformed_response(self, stream: _Stream) -> None:
        """RFC 9113 §8.1.1: a malformed response is a stream error (PROTOCOL_ERROR)."""
        stream.state = "rejected"
        self._events.append(StreamRejected(stream.id, 0))
        try:
            self._h2.reset_stream(stream.id, ErrorCodes.PROTOCOL_ERROR)
        except h2.exceptions.StreamClosedError:
            pass
        self._pull_h2()
        self._forget(stream)

    _H2_HANDLERS: ClassVar[dict[type, Callable[..., None]]] = {
        **_HboneProtocol._H2_HANDLERS,
        h2.events.ResponseReceived: _on_response,
        h2.events.InformationalResponseReceived: _on_informational,
    }


class HboneServerProtocol(_HboneProtocol):
    """The side that terminates CONNECT streams (the destination node's proxy)."""

    _client_side = False

    def __init__(self, *, max_streams: int = MAX_CONCURRENT_STREAMS) -> None:
        super().__init__(max_streams=max_streams)
        self._draining = False
        self._handled = 0       # CONNECTs that reached the handler (ConnectRequested)
        self._premature = 0     # reset before our answer, or refused as malformed (400)

    def accept(self, stream_id: int, headers: list[tuple[str, str]] | tuple[()] = ()) -> None:
        """Answer ``200``: the tunnel is open; DATA may flow both ways."""
        stream = self._requested_stream(stream_id)
        self._h2_call("accept", self._h2.send_headers, stream_id, [(":status", "200"), *headers])
        stream.state = "open"
        stream.sending = True

    def reject(self, stream_id: int, status: int) -> None:
        """Answer `status` with END_STREAM: 400 bad request, 401 not authorized, 503 unreachable."""
        if not 400 <= status <= 599:
            raise ValueError(f"reject status must be 4xx or 5xx, got {status}")
        stream = self._requested_stream(stream_id)
        self._reject(stream, status)

    def drain(self) -> None:
        """Graceful GOAWAY: streams already requested finish; newer ones are refused."""
        if self._draining or self._terminated:
            return
        self._draining = True
        self._h2.close_connection(ErrorCodes.NO_ERROR, b"draining")
        self._h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
        self._pull_h2()

    def _requested_stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or stream.state != "requested":
            raise LocalProtocolError(f"stream {stream_id} has no unanswered CONNECT",
                                     ErrorCodes.STREAM_CLOSED)
        return stream

    def _reject(self, stream: _Stream, status: int) -> None:
        self._h2_call("reject", self._h2.send_headers, stream.id, [(":status", str(status))],
                      end_stream=True)
        stream.state = "rejected"
        stream.local_ended = True
        stream.receiving = False
        # Whatever arrived before the answer will never be read: return its window.
        delivered, stream.delivered = stream.delivered, 0
        self._release_connection(delivered)
        self._maybe_forget(stream)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        h2_stream = self._h2.streams.get(stream_id)
        if h2_stream is None or h2_stream.closed:
            # Reset in the very read that opened it: h2 has closed (or already
            # dropped) the stream, and its StreamReset follows. Never a request.
            self._count_premature()
            return
        if self._h2_closed():
            return  # an error GOAWAY came in the same batch: nothing will be answered
        if self._draining:
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self._pull_h2()
            return
        stream = _Stream(stream_id, "requested", h2_stream)
        self._streams[stream_id] = stream
        pseudo, headers = _decode_headers(event.headers or [])
        authority = pseudo.get(":authority", "")
        try:
            if pseudo.get(":method") != "CONNECT":
                raise ValueError(f"method {pseudo.get(':method')!r} is not CONNECT")
            if ":protocol" in pseudo:
                raise ValueError("extended CONNECT (:protocol) is not HBONE")
            address = parse_authority(authority)
        except ValueError as exc:
            self._reject(stream, 400)
            self._events.append(RequestRefused(stream_id, 400, str(exc)))
            self._count_premature()
            return
        stream.receiving = True
        self._handled += 1
        self._events.append(ConnectRequested(stream_id, authority, address, headers))

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        premature = stream is not None and stream.state == "requested"
        super()._on_stream_reset(event)
        if premature:
            self._count_premature()

    def _count_premature(self) -> None:
        """Rapid reset (CVE-2023-44487): only CONNECTs that reached a handler count as
        work done, so a refused CONNECT cannot dilute the ratio of the reset ones."""
        self._premature += 1
        if self._premature > RAPID_RESET_MIN and self._premature * 2 > self._handled:
            self._connection_error(
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"{self._premature} streams reset or refused before an answer, "
                f"{self._handled} handled", PeerFault.RAPID_RESET)

    _H2_HANDLERS: ClassVar[dict[type, Callable[..., None]]] = {
        **_HboneProtocol._H2_HANDLERS,
        h2.events.RequestReceived: _on_request,
        h2.events.StreamReset: _on_stream_reset,
    }
