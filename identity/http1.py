"""A minimal sans-IO HTTP/1.1 codec for the CA API: one request per connection.

Rules, strict on purpose because this reads bytes from the network:
- the head (request line + headers) is at most `max_head` bytes and the body
  at most `max_body` bytes; we refuse before buffering more than that;
- a body needs a single `Content-Length`; `Transfer-Encoding` is refused, so
  there is exactly one way to find where a body ends (no smuggling);
- no obsolete line folding, no whitespace before a header's colon.
Every server connection answers once and closes (`Connection: close`), which
is why there is no keep-alive or pipelining state here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus

DEFAULT_MAX_HEAD = 16 * 1024
DEFAULT_MAX_BODY = 64 * 1024

# Always fullmatch: `$` also matches before a final newline.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.[01]")
# RFC 9110 15: a status outside 100..599 is invalid.
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9]{2})(?: .*)?")


class HttpError(Exception):
    """The peer broke the protocol or a limit; `status` is what to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Message:
    headers: tuple[tuple[str, str], ...]  # names lower-cased, order kept
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of header `name` (case-insensitive), or None if absent."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)


@dataclass(frozen=True)
class Request(Message):
    method: str = ""
    target: str = ""


@dataclass(frozen=True)
class Response(Message):
    status: int = 0


class RequestParser:
    """Feed bytes in; get a `Request` once the head and the whole body have arrived."""

    def __init__(self, *, max_head: int = DEFAULT_MAX_HEAD,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        self._buffer = bytearray()
        self._max_head = max_head
        self._max_body = max_body
        self._head: tuple[str, str, tuple[tuple[str, str], ...], int] | None = None
        self.target: str | None = None  # known once the request line parsed, for logs

    def feed(self, data: bytes) -> Request | None:
        """Add bytes; return the request when complete, None if more are needed."""
        self._buffer += data
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > self._max_head:
                    raise HttpError(431, f"request head exceeds {self._max_head} bytes")
                return None
            if end + 4 > self._max_head:
                raise HttpError(431, f"request head exceeds {self._max_head} bytes")
            self._head = self._parse_head(bytes(self._buffer[:end]))
            del self._buffer[:end + 4]
        method, target, headers, length = self._head
        if len(self._buffer) > length:
            raise HttpError(400, "more bytes than Content-Length (one request per connection)")
        if len(self._buffer) < length:
            return None
        return Request(headers=headers, body=bytes(self._buffer), method=method, target=target)

    def _parse_head(self, head: bytes) -> tuple[str, str, tuple[tuple[str, str], ...], int]:
        request_line, _, rest = head.partition(b"\r\n")
        match = _REQUEST_LINE.fullmatch(request_line)
        if match is None:
            raise HttpError(400, "malformed request line")
        method, target = match[1].decode(), match[2].decode("ascii", "replace")
        self.target = target
        headers = parse_headers(rest)
        length = body_length(headers, self._max_body)
        return method, target, headers, length


def parse_headers(block: bytes) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[str, str]] = []
    for line in block.split(b"\r\n") if block else []:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, f"malformed header line {line[:40]!r}")
        try:
            text = value.strip(b" \t").decode("ascii")
        except UnicodeDecodeError:
            raise HttpError(400, f"header {name.decode()} is not ASCII") from None
        if any(c in text for c in "\r\n\0"):  # RFC 9112 5.5: reject, or replace with SP
            raise HttpError(400, f"header {name.decode()} holds CR, LF or NUL")
        headers.append((name.decode().lower(), text))
    return tuple(headers)


def body_length(headers: tuple[tuple[str, str], ...], max_body: int) -> int:
    if any(name == "transfer-encoding" for name, _ in headers):
        raise HttpError(501, "Transfer-Encoding is not supported; send Content-Length")
    lengths = {value for name, value in headers if name == "content-length"}
    if not lengths:
        return 0
    text = next(iter(lengths))
    if len(lengths) > 1 or not text.isdigit():
        raise HttpError(400, "Content-Length must be one decimal number")
    # Judged by its digits first: int() refuses more than 4300 of them (ValueError).
    if len(text.lstrip("0")) > len(str(max_body)) or int(text) > max_body:
        raise HttpError(413, f"body of {text[:20]} bytes exceeds the {max_body}-byte limit")
    return int(text)


def render_response(status: int, body: bytes, *, content_type: str = "application/json",
                    extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    phrase = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {phrase}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in extra_headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def render_request(method: str, target: str, *, host: str, body: bytes = b"",
                   headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def parse_response(data: bytes, *, max_body: int = 1024 * 1024) -> Response:
    """A complete response read until the server closed the connection."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise HttpError(502, "response ended before the end of its headers")
    status_line, _, rest = head.partition(b"\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise HttpError(502, f"malformed status line {status_line[:40]!r}")
    headers = parse_headers(rest)
    try:
        length = body_length(headers, max_body)
    except HttpError as exc:
        raise HttpError(502, f"bad response framing: {exc.reason}") from None
    if any(name == "content-length" for name, _ in headers):
        if len(body) < length:
            raise HttpError(502, f"response body truncated: {len(body)} of {length} bytes")
        body = body[:length]
    return Response(headers=headers, body=body, status=int(match[1]))
