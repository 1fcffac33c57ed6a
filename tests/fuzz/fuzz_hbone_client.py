"""Fuzz the HBONE client core (tunnel/hbone.py): what a server answers on a pooled connection.

Three CONNECTs (streams 1, 3, 5) are open before the server's bytes arrive, so
responses, 1xx, data and resets have streams to land on. The input is the
server's bytes (its SETTINGS first), cut into reads by the first byte. A
malicious server may send anything (`:status` "²00", 101, endless 1xx): only
the core's own errors may escape.
"""

from __future__ import annotations

from hbone_fuzzing import feed

from tunnel import hbone

ALLOWED: tuple[type[BaseException], ...] = (hbone.RemoteProtocolError,)
MAX_LEN = 8 * 1024


def one_input(data: bytes) -> None:
    client = hbone.HboneClientProtocol()
    client.initiate()
    for port in (80, 443, 8080):
        client.open_stream(f"10.0.0.1:{port}", [("forwarded", 'for="10.0.0.2"')])
    client.data_to_send()
    feed(client, data)
