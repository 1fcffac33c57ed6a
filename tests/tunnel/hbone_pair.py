"""A client and a server HBONE protocol wired back to back in memory (no I/O)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import cycle

from tunnel import hbone


class Pair:
    """Moves bytes between the two protocols until both are quiet.

    `chunks` (optional) cuts every transfer into pieces of the given sizes,
    cycled, to prove the result does not depend on how reads split the stream.
    With `auto_ack`, every DataReceived is acknowledged as soon as it arrives,
    as a consumer that never falls behind would.
    """

    def __init__(self, *, chunks: list[int] | None = None, auto_ack: bool = True) -> None:
        self.client = hbone.HboneClientProtocol()
        self.server = hbone.HboneServerProtocol()
        self.client_events: list[hbone.Event] = []
        self.server_events: list[hbone.Event] = []
        self.auto_ack = auto_ack
        self._sizes: Iterator[int] | None = cycle(chunks) if chunks else None
        self._to_server = bytearray(self.client.initiate())
        self._to_client = bytearray(self.server.initiate())
        self.pump()

    def pump(self) -> None:
        while True:
            self._to_server += self.client.data_to_send()
            self._to_client += self.server.data_to_send()
            # Each side reads everything the other sends, as an adapter whose write
            # queue empties would report.
            self.client.output_drained()
            self.server.output_drained()
            if not self._to_server and not self._to_client:
                return
            if self._to_server:
                data, self._to_server = bytes(self._to_server), bytearray()
                self._deliver(data, self.server, self.server_events)
            if self._to_client:
                data, self._to_client = bytes(self._to_client), bytearray()
                self._deliver(data, self.client, self.client_events)

    def _deliver(self, data: bytes, proto: hbone._HboneProtocol,
                 sink: list[hbone.Event]) -> None:
        for piece in self._cut(data):
            events = proto.receive_data(piece)
            for event in events:
                if isinstance(event, hbone.DataReceived):
                    # Views into `piece`: copy, as a consumer that keeps bytes must.
                    event = hbone.DataReceived(event.stream_id, memoryview(bytes(event.data)),
                                               event.flow_controlled_length)
                    if self.auto_ack:
                        proto.acknowledge_received(event.stream_id, event.flow_controlled_length)
                sink.append(event)

    def _cut(self, data: bytes) -> Iterator[bytes]:
        if self._sizes is None:
            yield data
            return
        pos = 0
        while pos < len(data):
            size = next(self._sizes)
            yield data[pos:pos + size]
            pos += size

    def open(self, authority: str = "10.0.0.7:8080",
             headers: list[tuple[str, str]] | None = None) -> int:
        """Open a stream and have the server accept it; returns the stream id."""
        stream_id = self.client.open_stream(authority, headers or [])
        self.pump()
        self.server.accept(stream_id)
        self.pump()
        return stream_id

    def take(self, side: str, kind: type | tuple[type, ...]) -> list[hbone.Event]:
        """Remove and return the events of `kind` seen so far by `side`."""
        events = self.client_events if side == "client" else self.server_events
        taken = [e for e in events if isinstance(e, kind)]
        events[:] = [e for e in events if not isinstance(e, kind)]
        return taken


def received(events: list[hbone.Event], stream_id: int) -> bytes:
    return b"".join(bytes(e.data) for e in events
                    if isinstance(e, hbone.DataReceived) and e.stream_id == stream_id)


def only(events: list[hbone.Event], predicate: Callable[[hbone.Event], bool]) -> hbone.Event:
    matches = [e for e in events if predicate(e)]
    assert len(matches) == 1, matches
    return matches[0]
