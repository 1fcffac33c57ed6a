"""Fuzz the CA's HTTP/1.1 reader (identity/http1.py), both ends.

Input: the first byte picks the size of the pieces the request arrives in (the
server feeds ``RequestParser`` one socket read at a time); the rest is what a
client sends to the CA. The same bytes are also read as a CA's answer by
``parse_response``, the node agent's side.
"""

from __future__ import annotations

from identity.http1 import HttpError, RequestParser, parse_response

ALLOWED: tuple[type[BaseException], ...] = (HttpError,)
MAX_LEN = 16 * 1024
DICTIONARY = (b"\r\n", b"\r\n\r\n", b"Content-Length: ", b"Transfer-Encoding: ",
              b"HTTP/1.1 ", b"HTTP/1.0 ", b"POST ", b"GET ", b"/v1/sign", b"Host: ", b": ",
              b" 200 OK", b"99999999999999999999", b"\t", b"\x80")


def _request(data: bytes) -> None:
    step = 1 + (data[0] if data else 0) * 64
    parser = RequestParser()
    for start in range(1, len(data), step):
        request = parser.feed(data[start:start + step])
        if request is not None:
            assert len(request.body) <= 64 * 1024
            assert request.target == parser.target
            return


def one_input(data: bytes) -> None:
    try:
        _request(data)
    except HttpError as exc:
        assert 400 <= exc.status <= 599, exc
    response = parse_response(data[1:])
    assert 100 <= response.status <= 999
