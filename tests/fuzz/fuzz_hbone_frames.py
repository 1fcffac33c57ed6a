"""Fuzz the HBONE frame splitter (tunnel/hbone.py `_split`): how reads are cut must not matter.

The same server-bound bytes go to two server cores, once whole and once cut
into the pieces the first byte picks. When both readings succeed they must
give the same events (the data of each stream joined). The splitter hands DATA
out itself and everything else to h2, so this is where a frame header
straddling two reads, padding or a header block cut in the middle would show.

A peer that breaks the protocol may be cut off at different frames: our answers
go out between reads, so where a read ends changes the stream states the next
frames meet (HEADERS on a stream we already answered is a stream error while
the answer is pending, a connection error after it). Both are RFC 9113's; so a
RemoteProtocolError in either reading is not compared.
"""

from __future__ import annotations

from hbone_fuzzing import PREFACE, pieces

from tunnel import hbone

ALLOWED: tuple[type[BaseException], ...] = ()
MAX_LEN = 8 * 1024

Outcome = tuple[list[object], bool]


def _run(chunks: list[bytes]) -> Outcome:
    server = hbone.HboneServerProtocol()
    server.initiate()
    events: list[object] = []
    try:
        for chunk in chunks:
            for event in server.receive_data(chunk):
                if isinstance(event, hbone.DataReceived):
                    last = events[-1] if events else None
                    if isinstance(last, tuple) and last[0] == event.stream_id:
                        events[-1] = (event.stream_id, last[1] + bytes(event.data))
                    else:
                        events.append((event.stream_id, bytes(event.data)))
                else:
                    events.append(event)
            server.data_to_send()
    except hbone.RemoteProtocolError:
        return events, True
    return events, False


def _reset_streams(events: list[object]) -> set[int]:
    return {e.stream_id for e in events if isinstance(e, hbone.StreamReset)}


def _cut_off_streams(events: list[object]) -> set[int]:
    """Every stream of a connection the peer ended with an error GOAWAY: a CONNECT
    in the same read as that GOAWAY is never handled, one a read earlier is; both
    die with the connection, so whether it surfaced depends on the cut."""
    if not any(isinstance(e, hbone.ConnectionTerminated) and e.error_code for e in events):
        return set()
    return {e.stream_id for e in events if isinstance(e, hbone.ConnectRequested)}


def _settled(events: list[object], gone: set[int]) -> list[object]:
    """Drop what depends on where a reset fell: a stream reset in the same read as its
    HEADERS never becomes a request (nor a refusal), while one reset a read later
    does, and then is reset. Both are right; the rest must not depend on the cut."""
    return [e for e in events if not isinstance(e, hbone.RequestRefused)
            and (e[0] if isinstance(e, tuple) else getattr(e, "stream_id", None)) not in gone]


def one_input(data: bytes) -> None:
    wire = PREFACE + data[1:]
    whole = _run([wire])
    cut = _run(list(pieces((data[:1] or b"\x00") + wire)))
    if whole[1] or cut[1]:
        return
    gone = (_reset_streams(whole[0]) | _reset_streams(cut[0])
            | _cut_off_streams(whole[0]) | _cut_off_streams(cut[0]))
    assert _settled(whole[0], gone) == _settled(cut[0], gone), \
        f"events differ:\n{whole[0]}\n{cut[0]}"
