"""The sans-IO HBONE core: two protocol objects back to back, and vanilla h2 as a peer."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hbone_pair import Pair, only, received
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel import hbone

pytestmark = pytest.mark.unit

MiB = 1024 * 1024


def test_connect_is_accepted_with_authority_and_headers() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream("10.1.2.3:8080", [("forwarded", 'for="10.0.0.1:5555"')])
    pair.pump()
    request = only(pair.server_events, lambda e: isinstance(e, hbone.ConnectRequested))
    assert request == hbone.ConnectRequested(stream_id, "10.1.2.3:8080", ("10.1.2.3", 8080),
                                             (("forwarded", 'for="10.0.0.1:5555"'),))
    pair.server.accept(stream_id, [("x-trellis", "1")])
    pair.pump()
    accepted = only(pair.client_events, lambda e: isinstance(e, hbone.StreamAccepted))
    assert accepted == hbone.StreamAccepted(stream_id, (("x-trellis", "1"),))


def test_connect_request_has_no_scheme_or_path() -> None:
    """RFC 9113 §8.5: a CONNECT carries :method and :authority only."""
    client = hbone.HboneClientProtocol()
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                               header_encoding=None))
    raw.initiate_connection()
    raw.receive_data(client.initiate())
    client.receive_data(raw.data_to_send())
    client.open_stream("10.0.0.1:80", [])
    events = raw.receive_data(bytes(client.data_to_send()))
    request = only(events, lambda e: isinstance(e, h2.events.RequestReceived))
    names = [name for name, _ in request.headers]
    assert names == [b":method", b":authority"]


def test_data_flows_both_ways() -> None:
    pair = Pair()
    sid = pair.open()
    pair.client.send_data(sid, b"hello ")
    pair.client.send_data(sid, memoryview(b"server"))
    pair.server.send_data(sid, b"hi client")
    pair.pump()
    assert received(pair.server_events, sid) == b"hello server"
    assert received(pair.client_events, sid) == b"hi client"


def test_a_burst_is_framed_whole_and_its_output_memory_is_given_back() -> None:
    """Output is framed in place in one reused buffer, grown for a burst (here 3 MiB in
    one send) and shrunk at the next small flush, so an idle connection keeps little."""
    pair = Pair()
    sid = pair.open()
    burst = bytes(range(256)) * (3 * 4096)
    pair.client.send_data(sid, burst)
    wire = bytes(pair.client.data_to_send())
    assert len(wire) == len(burst) + 9 * (len(burst) // hbone.SEND_FRAME_SIZE)
    got = b"".join(bytes(e.data) for e in pair.server.receive_data(wire)
                   if isinstance(e, hbone.DataReceived))
    assert got == burst
    pair.client.send_data(sid, b"small")
    pair.pump()
    assert received(pair.server_events, sid) == b"small"
    assert pair.client.data_to_send().nbytes == 0
    assert len(pair.client._out.buffer) == 0


def test_send_is_buffered_past_the_window_and_released_by_acknowledgement() -> None:
    pair = Pair(auto_ack=False)
    sid = pair.open()
    payload = bytes(range(256)) * (40 * 1024)  # 10 MiB
    pair.client.send_data(sid, payload)
    pair.pump()
    got = received(pair.server_events, sid)
    assert len(got) == hbone.STREAM_WINDOW  # the stream window, not a byte more
    assert pair.client.buffered(sid) == len(payload) - hbone.STREAM_WINDOW
    while len(got) < len(payload):
        pair.server.acknowledge_received(sid, hbone.STREAM_WINDOW // 2)
        pair.pump()
        got = received(pair.server_events, sid)
    assert got == payload
    assert pair.client.buffered(sid) == 0


def test_connection_window_caps_all_streams_together() -> None:
    pair = Pair(auto_ack=False)
    streams = [pair.open() for _ in range(6)]
    for sid in streams:
        pair.client.send_data(sid, b"x" * hbone.STREAM_WINDOW)
    pair.pump()
    total = sum(len(received(pair.server_events, sid)) for sid in streams)
    assert total == hbone.CONNECTION_WINDOW
    # Acknowledging one stream's bytes lets the others continue.
    pair.server.acknowledge_received(streams[0], hbone.STREAM_WINDOW)
    pair.pump()
    total = sum(len(received(pair.server_events, sid)) for sid in streams)
    assert total == hbone.CONNECTION_WINDOW + hbone.STREAM_WINDOW


def test_client_half_close_then_server_keeps_sending() -> None:
    pair = Pair()
    sid = pair.open()
    pair.client.send_data(sid, b"request")
    pair.client.end_stream(sid)
    pair.pump()
    assert [type(e) for e in pair.server_events if not isinstance(e, hbone.ConnectRequested)] == \
        [hbone.DataReceived, hbone.StreamEnded]
    pair.server.send_data(sid, b"response after the client's FIN")
    pair.server.end_stream(sid)
    pair.pump()
    assert received(pair.client_events, sid) == b"response after the client's FIN"
    assert pair.take("client", hbone.StreamEnded) == [hbone.StreamEnded(sid)]
    assert pair.client.open_streams == pair.server.open_streams == 0


def test_server_half_close_then_client_keeps_sending() -> None:
    pair = Pair()
    sid = pair.open()
    pair.server.end_stream(sid)
    pair.pump()
    assert pair.take("client", hbone.StreamEnded) == [hbone.StreamEnded(sid)]
    pair.client.send_data(sid, b"still talking")
    pair.client.end_stream(sid)
    pair.pump()
    assert received(pair.server_events, sid) == b"still talking"
    assert pair.take("server", hbone.StreamEnded) == [hbone.StreamEnded(sid)]
    assert pair.client.open_streams == pair.server.open_streams == 0


def test_end_stream_waits_for_buffered_bytes() -> None:
    pair = Pair(auto_ack=False)
    sid = pair.open()
    payload = b"t" * (hbone.STREAM_WINDOW + 12345)
    pair.client.send_data(sid, payload)
    pair.client.end_stream(sid)
    pair.pump()
    assert not pair.take("server", hbone.StreamEnded)  # the tail is still buffered
    with pytest.raises(hbone.LocalProtocolError):
        pair.client.send_data(sid, b"after end")
    pair.server.acknowledge_received(sid, hbone.STREAM_WINDOW)
    pair.pump()
    assert received(pair.server_events, sid) == payload
    assert pair.server_events[-1] == hbone.StreamEnded(sid)


@pytest.mark.parametrize("resetter", ["client", "server"])
def test_reset_reaches_the_other_side(resetter: str) -> None:
    pair = Pair()
    sid = pair.open()
    pair.client.send_data(sid, b"x" * 100)
    pair.pump()
    proto, other = ((pair.client, "server") if resetter == "client" else (pair.server, "client"))
    proto.reset_stream(sid, ErrorCodes.CONNECT_ERROR)
    pair.pump()
    assert pair.take(other, hbone.StreamReset) == [hbone.StreamReset(sid, ErrorCodes.CONNECT_ERROR)]
    assert pair.client.open_streams == pair.server.open_streams == 0
    with pytest.raises(hbone.LocalProtocolError):
        proto.send_data(sid, b"late")


def test_reset_returns_unconsumed_bytes_to_the_connection_window() -> None:
    pair = Pair(auto_ack=False)
    streams = [pair.open() for _ in range(4)]
    for sid in streams:  # fill the whole connection window, consume nothing
        pair.client.send_data(sid, b"x" * hbone.STREAM_WINDOW)
    pair.pump()
    for sid in streams:
        pair.server.reset_stream(sid)
    pair.pump()
    fresh = pair.open()
    pair.client.send_data(fresh, b"y" * 1000)
    pair.pump()
    assert received(pair.server_events, fresh) == b"y" * 1000


@pytest.mark.parametrize("status", [401, 400, 503])
def test_reject_reaches_the_client_and_frees_the_slot(status: int) -> None:
    pair = Pair()
    sid = pair.client.open_stream("10.0.0.1:80", [])
    pair.pump()
    pair.server.reject(sid, status)
    pair.pump()
    assert pair.client_events == [hbone.StreamRejected(sid, status)]
    assert pair.client.open_streams == pair.server.open_streams == 0
    assert pair.client.available_streams == hbone.MAX_CONCURRENT_STREAMS


def test_reject_only_answers_errors() -> None:
    pair = Pair()
    sid = pair.client.open_stream("10.0.0.1:80", [])
    pair.pump()
    with pytest.raises(ValueError, match="4xx or 5xx"):
        pair.server.reject(sid, 302)


@pytest.mark.parametrize("authority", [
    "backend.default.svc:8080", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:http",
    "::1:80", "[10.0.0.1]:80", ":80", "10.0.0.256:80", "",
])
def test_malformed_authority_is_refused_with_400(authority: str) -> None:
    pair = Pair()
    sid = pair.client.open_stream(authority or "x", [])
    if not authority:  # h2 refuses to send an empty :authority; test the parser alone
        with pytest.raises(ValueError):
            hbone.parse_authority(authority)
        return
    pair.pump()
    refused = only(pair.server_events, lambda e: isinstance(e, hbone.RequestRefused))
    assert (refused.stream_id, refused.status) == (sid, 400)
    assert not any(isinstance(e, hbone.ConnectRequested) for e in pair.server_events)
    assert pair.client_events == [hbone.StreamRejected(sid, 400)]


def test_authority_parser_accepts_ipv4_and_bracketed_ipv6() -> None:
    assert hbone.parse_authority("10.0.0.1:1") == ("10.0.0.1", 1)
    assert hbone.parse_authority("[fd00::0001]:65535") == ("fd00::1", 65535)


def test_non_connect_method_is_refused_with_400() -> None:
    server = hbone.HboneServerProtocol()
    raw = _raw_client()
    server.receive_data(raw.data_to_send())
    raw.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                         (":authority", "10.0.0.1:80")], end_stream=True)
    events = server.receive_data(raw.data_to_send())
    assert events == [hbone.RequestRefused(1, 400, "method 'GET' is not CONNECT")]
    responses = raw.receive_data(bytes(server.data_to_send()))
    response = only(responses, lambda e: isinstance(e, h2.events.ResponseReceived))
    assert (b":status", b"400") in response.headers


def test_client_stops_at_100_streams_and_reuses_freed_slots() -> None:
    pair = Pair()
    streams = [pair.client.open_stream("10.0.0.1:80", []) for _ in range(100)]
    assert pair.client.available_streams == 0
    with pytest.raises(hbone.StreamLimitReached):
        pair.client.open_stream("10.0.0.1:80", [])
    pair.pump()
    assert len(pair.take("server", hbone.ConnectRequested)) == 100
    pair.client.reset_stream(streams[0])
    pair.pump()
    assert pair.client.available_streams == 1
    pair.client.open_stream("10.0.0.1:80", [])


def test_server_refuses_a_peer_that_opens_more_than_100_streams() -> None:
    server = hbone.HboneServerProtocol()
    raw = _raw_client()
    server.receive_data(raw.data_to_send())
    raw.receive_data(bytes(server.data_to_send()))  # learn the limit... and ignore it
    raw.remote_settings.max_concurrent_streams = 1000
    for i in range(101):
        raw.send_headers(1 + 2 * i, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    with pytest.raises(hbone.RemoteProtocolError) as caught:
        server.receive_data(raw.data_to_send())
    assert caught.value.error_code == ErrorCodes.PROTOCOL_ERROR
    goaway = only(raw.receive_data(bytes(server.data_to_send())),
                  lambda e: isinstance(e, h2.events.ConnectionTerminated))
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR


def test_graceful_goaway_lets_open_streams_finish_and_refuses_new_ones() -> None:
    pair = Pair()
    sid = pair.open()
    late = pair.client.open_stream("10.0.0.1:80", [])  # not yet seen by the server
    pair.server.drain()
    pair.pump()
    terminated = only(pair.client_events, lambda e: isinstance(e, hbone.ConnectionTerminated))
    assert terminated.error_code == ErrorCodes.NO_ERROR
    assert terminated.last_stream_id == sid
    assert pair.take("client", hbone.StreamReset) == [
        hbone.StreamReset(late, ErrorCodes.REFUSED_STREAM)]
    assert pair.client.available_streams == 0
    with pytest.raises(hbone.StreamLimitReached):
        pair.client.open_stream("10.0.0.1:80", [])
    # The stream opened before the GOAWAY still works both ways, to the end.
    pair.client.send_data(sid, b"after goaway")
    pair.client.end_stream(sid)
    pair.server.send_data(sid, b"reply")
    pair.server.end_stream(sid)
    pair.pump()
    assert received(pair.server_events, sid) == b"after goaway"
    assert received(pair.client_events, sid) == b"reply"
    assert pair.client.open_streams == pair.server.open_streams == 0


def test_goaway_with_an_error_terminates() -> None:
    pair = Pair()
    pair.open()
    pair.server.close_connection(ErrorCodes.INTERNAL_ERROR, "shutting down")
    pair.pump()
    terminated = only(pair.client_events, lambda e: isinstance(e, hbone.ConnectionTerminated))
    assert terminated == hbone.ConnectionTerminated(ErrorCodes.INTERNAL_ERROR, "shutting down", 1)
    assert pair.client.is_terminated
    assert pair.client.available_streams == 0


def test_data_on_stream_zero_is_a_connection_error() -> None:
    pair = Pair()
    with pytest.raises(hbone.RemoteProtocolError) as caught:
        pair.server.receive_data(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    assert caught.value.error_code == ErrorCodes.PROTOCOL_ERROR
    assert pair.server.is_terminated
    assert pair.server.receive_data(b"anything") == []


def test_oversized_frame_is_refused_before_it_is_buffered() -> None:
    pair = Pair()
    sid = pair.open()
    header = (hbone.MAX_FRAME_SIZE + 1).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big")
    with pytest.raises(hbone.RemoteProtocolError) as caught:
        pair.server.receive_data(header)
    assert caught.value.error_code == ErrorCodes.FRAME_SIZE_ERROR


def test_peer_that_overruns_the_stream_window_is_cut_off() -> None:
    pair = Pair(auto_ack=False)
    sid = pair.open()
    pair.client.send_data(sid, b"x" * hbone.STREAM_WINDOW)
    pair.pump()
    frame = (10).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big") + b"y" * 10
    with pytest.raises(hbone.RemoteProtocolError) as caught:
        pair.server.receive_data(frame)
    assert caught.value.error_code == ErrorCodes.FLOW_CONTROL_ERROR


def test_data_before_the_response_is_a_protocol_error() -> None:
    pair = Pair()
    sid = pair.client.open_stream("10.0.0.1:80", [])
    frame = (3).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big") + b"abc"
    with pytest.raises(hbone.RemoteProtocolError):
        pair.client.receive_data(frame)


def test_rapid_reset_gets_enhance_your_calm() -> None:
    server = hbone.HboneServerProtocol()
    raw = _raw_client()
    server.receive_data(raw.data_to_send())
    with pytest.raises(hbone.RemoteProtocolError) as caught:
        for i in range(300):
            raw.send_headers(1 + 2 * i, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
            raw.reset_stream(1 + 2 * i, ErrorCodes.CANCEL)
            server.receive_data(raw.data_to_send())
    assert caught.value.error_code == ErrorCodes.ENHANCE_YOUR_CALM


# --------------------------------------------------- vanilla h2 as the peer

def _raw_client() -> h2.connection.H2Connection:
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                               header_encoding=None))
    raw.initiate_connection()
    return raw


def test_vanilla_h2_client_with_padded_frames_reaches_our_server() -> None:
    server = hbone.HboneServerProtocol()
    raw = _raw_client()
    server.receive_data(raw.data_to_send())
    raw.receive_data(bytes(server.initiate()))
    raw.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.9:443")])
    server.receive_data(raw.data_to_send())
    server.accept(1)
    raw.receive_data(bytes(server.data_to_send()))
    raw.send_data(1, b"padded payload", pad_length=17)
    raw.send_data(1, b"", pad_length=0)
    raw.send_data(1, b"plain", end_stream=True)
    wire = raw.data_to_send()
    events = []
    for i in range(len(wire)):  # one byte at a time: every split point
        events += [e if not isinstance(e, hbone.DataReceived)
                   else hbone.DataReceived(e.stream_id, memoryview(bytes(e.data)),
                                           e.flow_controlled_length)
                   for e in server.receive_data(wire[i:i + 1])]
    assert received(events, 1) == b"padded payloadplain"
    assert events[-1] == hbone.StreamEnded(1)


def test_our_client_reads_data_sent_by_vanilla_h2() -> None:
    client = hbone.HboneClientProtocol()
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                               header_encoding=None))
    raw.initiate_connection()
    raw.receive_data(client.initiate())
    client.receive_data(raw.data_to_send())
    sid = client.open_stream("10.0.0.1:80", [])
    raw.receive_data(bytes(client.data_to_send()))
    raw.send_headers(sid, [(":status", "200")])
    payload = bytes(range(256)) * 200
    for start in range(0, len(payload), 16384):
        raw.send_data(sid, payload[start:start + 16384])
    raw.end_stream(sid)
    events = client.receive_data(raw.data_to_send())
    assert events[0] == hbone.StreamAccepted(sid, ())
    assert received(events, sid) == payload
    assert events[-1] == hbone.StreamEnded(sid)
    # And what our client sends, vanilla h2 decodes.
    client.send_data(sid, payload)
    client.end_stream(sid)
    raw_events = raw.receive_data(bytes(client.data_to_send()))
    got = b"".join(e.data for e in raw_events if isinstance(e, h2.events.DataReceived))
    assert got == payload
    assert isinstance(raw_events[-1], h2.events.StreamEnded)


# ------------------------------------------------------------- hypothesis

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=12),
    uploads=st.lists(st.integers(min_value=0, max_value=300_000), min_size=1, max_size=4),
    seed=st.integers(min_value=0, max_value=255),
)
def test_random_chunking_delivers_identical_bytes(chunks: list[int], uploads: list[int],
                                                  seed: int) -> None:
    pair = Pair(chunks=chunks)
    streams = [pair.open(f"10.0.0.{i + 1}:80") for i in range(len(uploads))]
    payloads = {sid: bytes((seed + i) % 256 for i in range(size)) * 1
                for sid, size in zip(streams, uploads, strict=True)}
    for sid, payload in payloads.items():
        pair.client.send_data(sid, payload)
        pair.client.end_stream(sid)
        pair.server.send_data(sid, payload[::-1])
        pair.server.end_stream(sid)
    pair.pump()
    for sid, payload in payloads.items():
        assert received(pair.server_events, sid) == payload
        assert received(pair.client_events, sid) == payload[::-1]
        for events in (pair.server_events, pair.client_events):
            mine = [e for e in events if getattr(e, "stream_id", None) == sid]
            assert mine[-1] == hbone.StreamEnded(sid)
            assert sum(isinstance(e, hbone.StreamEnded) for e in mine) == 1
    assert pair.client.open_streams == pair.server.open_streams == 0
