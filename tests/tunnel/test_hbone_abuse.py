"""The sans-IO HBONE core against a peer that abuses HTTP/2 (issue 10, findings 2, 3, 4, 7).

The peer is vanilla h2 with its own checks off where an attacker would turn
them off; our core is driven exactly as the adapter drives it.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hbone_pair import Pair, only

from tunnel import hbone

pytestmark = pytest.mark.unit

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
BAD_CONNECT = [(":method", "CONNECT"), (":authority", "nonsense")]


def _raw_client() -> h2.connection.H2Connection:
    raw = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None))
    raw.initiate_connection()
    raw.remote_settings.max_concurrent_streams = 100_000  # ignore what we are told
    return raw


def _server_and_raw() -> tuple[hbone.HboneServerProtocol, h2.connection.H2Connection]:
    server = hbone.HboneServerProtocol()
    raw = _raw_client()
    server.initiate()
    server.receive_data(raw.data_to_send())
    server.data_to_send()
    return server, raw


def _raw_server() -> h2.connection.H2Connection:
    return h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_outbound_headers=False))


def _client_and_raw() -> tuple[hbone.HboneClientProtocol, h2.connection.H2Connection, int]:
    client = hbone.HboneClientProtocol()
    raw = _raw_server()
    raw.initiate_connection()
    raw.receive_data(client.initiate())
    client.receive_data(raw.data_to_send())
    sid = client.open_stream("10.0.0.1:80", [])
    raw.receive_data(bytes(client.data_to_send()))
    return client, raw, sid


# ------------------------------------------------ finding 4: events lost on a reset

def test_headers_reset_headers_in_one_read_loses_no_event() -> None:
    """h2 drops stream 1 while it counts streams for HEADERS(3); looking 1 up raised
    KeyError out of receive_data and lost the request on stream 3."""
    server, raw = _server_and_raw()
    raw.send_headers(1, CONNECT)
    raw.reset_stream(1, ErrorCodes.CANCEL)
    raw.send_headers(3, CONNECT)
    events = server.receive_data(raw.data_to_send())
    assert events == [hbone.ConnectRequested(3, "10.0.0.1:80", ("10.0.0.1", 80), ())]
    assert server.open_streams == 1


def test_a_stream_reset_in_the_read_that_opened_it_is_no_request() -> None:
    server, raw = _server_and_raw()
    raw.send_headers(1, CONNECT)
    raw.reset_stream(1, ErrorCodes.CANCEL)
    assert server.receive_data(raw.data_to_send()) == []
    assert server.open_streams == 0
    # Positive control: the same CONNECT without the reset is a request.
    raw.send_headers(3, CONNECT)
    assert [type(e) for e in server.receive_data(raw.data_to_send())] == [
        hbone.ConnectRequested]


# ------------------------------------------------ finding 3: rapid reset, bypassed

def _bad_then_reset_rounds(server: hbone.HboneServerProtocol, raw: h2.connection.H2Connection,
                           rounds: int) -> int:
    """One bad CONNECT (refused 400) per CONNECT that reaches a handler and is then
    reset: the review's bypass. Returns the round that got GOAWAY, or -1."""
    for i in range(rounds):
        bad, good = 1 + 4 * i, 3 + 4 * i
        raw.send_headers(bad, BAD_CONNECT, end_stream=True)
        raw.send_headers(good, CONNECT)
        try:
            server.receive_data(raw.data_to_send())  # the good one reaches its handler...
            raw.reset_stream(good, ErrorCodes.CANCEL)
            server.receive_data(raw.data_to_send())  # ...and is reset before an answer
        except hbone.RemoteProtocolError as exc:
            assert exc.error_code == ErrorCodes.ENHANCE_YOUR_CALM
            assert exc.fault is hbone.PeerFault.RAPID_RESET
            return i
        server.data_to_send()
    return -1


def test_bad_connects_do_not_dilute_the_rapid_reset_ratio() -> None:
    """Before: 20,000 rounds went by without a GOAWAY (each 400 counted as work done)."""
    server, raw = _server_and_raw()
    got_goaway_at = _bad_then_reset_rounds(server, raw, 2_000)
    assert 0 < got_goaway_at <= hbone.RAPID_RESET_MIN
    goaway = only(_raw_events(raw, server), lambda e: isinstance(e, h2.events.ConnectionTerminated))
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_streams_that_are_answered_keep_a_connection_clear_of_the_guard() -> None:
    """Positive control: the same number of streams, answered before the reset, is fine."""
    server, raw = _server_and_raw()
    for i in range(3 * hbone.RAPID_RESET_MIN):
        sid = 1 + 2 * i
        raw.send_headers(sid, CONNECT)
        server.receive_data(raw.data_to_send())
        server.accept(sid)
        raw.reset_stream(sid, ErrorCodes.CANCEL)
        server.receive_data(raw.data_to_send())
        server.data_to_send()
    assert not server.is_terminated


def test_resets_in_the_same_read_as_their_headers_count_as_premature() -> None:
    server, raw = _server_and_raw()
    with pytest.raises(hbone.RemoteProtocolError) as caught:
        for i in range(2 * hbone.RAPID_RESET_MIN):
            raw.send_headers(1 + 2 * i, CONNECT)
            raw.reset_stream(1 + 2 * i, ErrorCodes.CANCEL)
            server.receive_data(raw.data_to_send())
    assert caught.value.fault is hbone.PeerFault.RAPID_RESET


def _raw_events(raw: h2.connection.H2Connection,
                proto: hbone._HboneProtocol) -> list[h2.events.Event]:
    try:
        return raw.receive_data(bytes(proto.data_to_send()))
    except h2.exceptions.ProtocolError:
        return []


# ------------------------------------------------ finding 2: answers never read

@pytest.mark.parametrize("frame", ["ping", "settings"])
def test_a_peer_that_never_reads_our_answers_gets_enhance_your_calm(frame: str) -> None:
    server, raw = _server_and_raw()
    sent = 0
    with pytest.raises(hbone.RemoteProtocolError) as caught:
        while sent < 100_000:  # bounded: the guard must bite long before
            for _ in range(100):
                raw.ping(sent.to_bytes(8, "big")) if frame == "ping" else raw.update_settings({})
                sent += 1
            server.receive_data(raw.data_to_send())
            # The adapter's output never drains: it never calls output_drained().
    assert caught.value.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert caught.value.fault is hbone.PeerFault.FLOOD
    answer_size = 17 if frame == "ping" else 9
    assert sent * answer_size < 2 * hbone.MAX_UNSENT_ANSWERS + 100 * answer_size
    queued = server.data_to_send().nbytes
    assert queued < 2 * hbone.MAX_UNSENT_ANSWERS + 100 * answer_size + 100


def test_one_big_read_of_pings_is_checked_in_batches() -> None:
    """A 256 KiB read of PINGs must not queue 256 KiB of ACKs before the first check."""
    server, raw = _server_and_raw()
    for i in range(256 * 1024 // 17):
        raw.ping(i.to_bytes(8, "big"))
    with pytest.raises(hbone.RemoteProtocolError):
        server.receive_data(raw.data_to_send())
    assert server.data_to_send().nbytes < 3 * hbone.MAX_UNSENT_ANSWERS


def test_pings_from_a_peer_that_reads_are_answered_forever() -> None:
    """Positive control: the same flood, with our output drained between reads."""
    server, raw = _server_and_raw()
    for round_ in range(100):
        for i in range(100):
            raw.ping((round_ * 100 + i).to_bytes(8, "big"))
        server.receive_data(raw.data_to_send())
        acks = raw.receive_data(bytes(server.data_to_send()))
        server.output_drained()
        assert sum(isinstance(e, h2.events.PingAckReceived) for e in acks) == 100
    assert not server.is_terminated


# ------------------------------------------------ finding 7: statuses and 1xx

@pytest.mark.parametrize("status", [b"\xb200", b"\xb2\xb3\xb9", "٢٠٠".encode(), b"2000", b"20",
                                    b"abc", b"600", b"099", b"+20"])
def test_a_status_that_is_not_three_ascii_digits_is_a_malformed_response(status: bytes) -> None:
    """Byte 0xB2 is '²' in latin-1: '²00'.isdigit() is True, and int('²00') raised
    ValueError out of receive_data."""
    client, raw, sid = _client_and_raw()
    raw.send_headers(sid, [(b":status", status)])
    events = client.receive_data(raw.data_to_send())
    assert events == [hbone.StreamRejected(sid, 0)]
    assert client.open_streams == 0
    reset = only(raw.receive_data(bytes(client.data_to_send())),
                 lambda e: isinstance(e, h2.events.StreamReset))
    assert reset.error_code == ErrorCodes.PROTOCOL_ERROR


def test_interim_answers_are_skipped_until_the_final_one() -> None:
    client, raw, sid = _client_and_raw()
    raw.send_headers(sid, [(":status", "100")])
    raw.send_headers(sid, [(":status", "103"), ("link", "</style.css>")])
    assert client.receive_data(raw.data_to_send()) == []
    raw.send_headers(sid, [(":status", "200")])
    assert client.receive_data(raw.data_to_send()) == [hbone.StreamAccepted(sid, ())]


def test_101_is_malformed_in_http2() -> None:
    client, raw, sid = _client_and_raw()
    raw.send_headers(sid, [(":status", "101")])
    assert client.receive_data(raw.data_to_send()) == [hbone.StreamRejected(sid, 0)]
    assert client.available_streams == hbone.MAX_CONCURRENT_STREAMS


# ------------------------------------------------ streams per connection

def test_max_streams_is_our_setting_and_is_enforced() -> None:
    server = hbone.HboneServerProtocol(max_streams=5)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None))
    raw.initiate_connection()
    server.receive_data(raw.data_to_send())
    raw.receive_data(bytes(server.initiate()))
    assert raw.remote_settings.max_concurrent_streams == 5
    raw.remote_settings.max_concurrent_streams = 100  # ...and ignore it
    raw.remote_settings.acknowledge()
    for i in range(6):
        raw.send_headers(1 + 2 * i, CONNECT)
    with pytest.raises(hbone.RemoteProtocolError):
        server.receive_data(raw.data_to_send())


def test_the_client_opens_no_more_than_its_limit() -> None:
    pair = Pair()
    pair.client.limit_streams(3)
    for _ in range(3):
        pair.client.open_stream("10.0.0.1:80", [])
    assert pair.client.available_streams == 0
    with pytest.raises(hbone.StreamLimitReached):
        pair.client.open_stream("10.0.0.1:80", [])


# ------------------------------------------------ found by fuzzing (tests/fuzz/fuzz_hbone_*)

@pytest.mark.parametrize("code", [ErrorCodes.NO_ERROR, ErrorCodes.INTERNAL_ERROR])
def test_a_bad_connect_and_a_goaway_in_one_read_raise_nothing(code: ErrorCodes) -> None:
    """fuzz_hbone_server: h2 takes in the GOAWAY before we answer the CONNECT ahead of it,
    and refused our 400 (LocalProtocolError out of receive_data)."""
    server, raw = _server_and_raw()
    raw.send_headers(1, BAD_CONNECT, end_stream=True)
    raw.close_connection(code)
    events = server.receive_data(raw.data_to_send())
    terminated = events[-1]
    assert isinstance(terminated, hbone.ConnectionTerminated)
    assert terminated.error_code == code
    if code == ErrorCodes.NO_ERROR:  # graceful: the request still gets its answer
        assert [type(e) for e in events] == [hbone.RequestRefused, hbone.ConnectionTerminated]
        assert (0x1, 1) in _frames(bytes(server.data_to_send()))  # HEADERS(400) on 1
    else:  # the connection is over: nothing is answered
        assert events == [terminated]


def test_frames_after_an_error_goaway_in_the_same_read_are_not_judged() -> None:
    """fuzz_hbone_frames: with the GOAWAY and what follows in one read, the frames after
    an error GOAWAY raised RemoteProtocolError; read apart they were ignored. Now both
    readings end the same way: the GOAWAY is the last event."""
    server, raw = _server_and_raw()
    raw.close_connection(ErrorCodes.INTERNAL_ERROR)
    data_on_stream_0 = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"
    wire = raw.data_to_send() + data_on_stream_0
    events = server.receive_data(wire)
    assert [type(e) for e in events] == [hbone.ConnectionTerminated]
    apart, raw_apart = _server_and_raw()
    raw_apart.close_connection(ErrorCodes.INTERNAL_ERROR)
    assert apart.receive_data(raw_apart.data_to_send()) == events
    assert apart.receive_data(data_on_stream_0) == []


def _frames(wire: bytes) -> list[tuple[int, int]]:
    """(type, stream id) of each frame in `wire`."""
    frames, pos = [], 0
    while pos + 9 <= len(wire):
        length = int.from_bytes(wire[pos:pos + 3], "big")
        frames.append((wire[pos + 3], int.from_bytes(wire[pos + 5:pos + 9], "big") & 0x7FFFFFFF))
        pos += 9 + length
    return frames


def test_an_oversized_frame_after_an_error_goaway_in_the_same_read_is_not_judged() -> None:
    """fuzz_hbone_frames: the size check ran before the GOAWAY ahead of it was read."""
    server, raw = _server_and_raw()
    raw.close_connection(ErrorCodes.INTERNAL_ERROR)
    oversized = (hbone.MAX_FRAME_SIZE + 1).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    events = server.receive_data(raw.data_to_send() + oversized)
    assert [type(e) for e in events] == [hbone.ConnectionTerminated]
    # Positive control: the same frame without the GOAWAY is refused.
    server, raw = _server_and_raw()
    with pytest.raises(hbone.RemoteProtocolError):
        server.receive_data(oversized)


def test_the_first_error_goaway_is_the_last_event_of_a_read() -> None:
    """fuzz_hbone_frames: two GOAWAYs in one read gave two ConnectionTerminated events,
    read apart only one (the connection is over after the first)."""
    server, raw = _server_and_raw()
    raw.close_connection(ErrorCodes.INTERNAL_ERROR)
    first = raw.data_to_send()
    goaway_again = first[:-4] + ErrorCodes.PROTOCOL_ERROR.to_bytes(4, "big")
    events = server.receive_data(first + goaway_again)
    assert events == [hbone.ConnectionTerminated(ErrorCodes.INTERNAL_ERROR, "", 0)]


def test_ending_a_stream_after_an_error_goaway_raises_nothing_of_h2s() -> None:
    """fuzz_hbone_client: the peer ends a stream and sends an error GOAWAY in one read;
    our end_stream for it then raised h2's ProtocolError (connection CLOSED) instead
    of leaving nothing to do on a dead connection."""
    client, raw, sid = _client_and_raw()
    raw.send_headers(sid, [(":status", "200")])
    client.receive_data(raw.data_to_send())
    raw.end_stream(sid)
    raw.close_connection(ErrorCodes.PROTOCOL_ERROR)
    events = client.receive_data(raw.data_to_send())
    assert any(isinstance(e, hbone.StreamEnded) for e in events)  # positive control
    assert client.is_terminated
    try:
        client.end_stream(sid)
    except hbone.LocalProtocolError:
        pass  # refused in our own terms is fine too
