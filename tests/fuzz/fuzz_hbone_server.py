"""Fuzz the HBONE server core (tunnel/hbone.py): what a client sends to 15008 after TLS.

The input is the client's bytes after its connection preface, cut into reads by
its first byte (`hbone_fuzzing.pieces`); CONNECTs are accepted or rejected and
data echoed, as the adapter does. Only the core's own errors may escape: a
peer's bytes must end in events or a GOAWAY (RemoteProtocolError), never in
KeyError, ValueError or anything of h2's.
"""

from __future__ import annotations

from hbone_fuzzing import PREFACE, feed

from tunnel import hbone

ALLOWED: tuple[type[BaseException], ...] = (hbone.RemoteProtocolError,)
MAX_LEN = 8 * 1024


def one_input(data: bytes) -> None:
    server = hbone.HboneServerProtocol()
    server.initiate()
    feed(server, data[:1] + PREFACE + data[1:])
