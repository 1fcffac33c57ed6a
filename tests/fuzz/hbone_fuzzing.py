"""What the three HBONE fuzz targets share: cutting the input, driving a protocol like
its adapter does. Not a target itself (no ``fuzz_`` prefix)."""

from __future__ import annotations

from collections.abc import Iterator

from tunnel import hbone

# The client's connection preface: server-side inputs start after it, so the
# fuzzer spends its time on frames, not on guessing 24 fixed bytes.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def pieces(data: bytes) -> Iterator[bytes]:
    """The first byte picks how reads cut the rest: 0 whole, else pieces of 1..255 bytes."""
    if not data:
        return
    step = data[0] or len(data)
    body = data[1:]
    for start in range(0, len(body), step):
        yield body[start:start + step]


def act(proto: hbone._HboneProtocol, events: list[hbone.Event]) -> None:
    """Answer events as the adapter would: acknowledge and echo data, end on end, and (on
    the server) accept or reject CONNECTs by stream id. Our own calls may be refused
    (a stream reset in the same read): LocalProtocolError is the caller's to handle."""
    for event in events:
        try:
            if isinstance(event, hbone.ConnectRequested):
                assert isinstance(proto, hbone.HboneServerProtocol)
                if event.stream_id % 4 == 1:
                    proto.accept(event.stream_id)
                elif event.stream_id % 4 == 3:
                    proto.reject(event.stream_id, 401)
            elif isinstance(event, hbone.DataReceived):
                proto.acknowledge_received(event.stream_id, event.flow_controlled_length)
                proto.send_data(event.stream_id, bytes(event.data[:64]))
            elif isinstance(event, hbone.StreamEnded):
                proto.end_stream(event.stream_id)
        except hbone.LocalProtocolError:
            pass


def feed(proto: hbone._HboneProtocol, data: bytes) -> None:
    """Every piece in, every answer out, until the peer breaks the protocol."""
    for piece in pieces(data):
        events = proto.receive_data(piece)
        act(proto, events)
        proto.data_to_send()
        if proto.is_terminated:
            return
