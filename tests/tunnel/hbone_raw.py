"""An HBONE peer that misbehaves: a real TLS client with a valid certificate that writes
HTTP/2 frames of its choosing and reads only when it wants to. Blocking; run it in a
thread (``asyncio.to_thread``) beside the server's event loop."""

from __future__ import annotations

import socket
import ssl
import struct
import time

import h2.config
import h2.connection

from identity.certs import CertBundle
from tunnel import tls

PING, SETTINGS, GOAWAY = 0x6, 0x4, 0x7
_HEADER = struct.Struct(">BHBBL")


def frame(frame_type: int, payload: bytes = b"", *, flags: int = 0, stream_id: int = 0) -> bytes:
    n = len(payload)
    return _HEADER.pack(n >> 16, n & 0xFFFF, frame_type, flags, stream_id) + payload


class RawPeer:
    def __init__(self, bundle: CertBundle, address: tuple[str, int], *,
                 receive_buffer: int | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # small: the kernel holds little of what we do not read
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(5)
        sock.connect(address)
        self.sock: ssl.SSLSocket = tls.client_context(bundle).wrap_socket(sock)
        # An attacker checks nothing it is told, and may open as many streams as it likes.
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_inbound_headers=False))
        self.h2.initiate_connection()
        self.h2.remote_settings.max_concurrent_streams = 1_000_000
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())

    def send_until_blocked(self, chunk: bytes, *, limit: int, stall_s: float = 0.5) -> int:
        """Send `chunk` again and again, reading nothing, until `limit` bytes went out,
        the server stopped taking them for `stall_s`, or it closed. Returns bytes sent."""
        self.sock.settimeout(stall_s)
        sent = 0
        try:
            while sent < limit:
                self.sock.sendall(chunk)
                sent += len(chunk)
        except (TimeoutError, OSError):
            pass
        return sent

    def read_until_goaway(self, timeout_s: float = 10.0) -> tuple[int | None, bytes]:
        """Read everything until a GOAWAY or EOF; its error code (None if none), and the
        frame types seen (one byte each)."""
        self.sock.settimeout(timeout_s)
        deadline = time.monotonic() + timeout_s
        buffer = bytearray()
        types = bytearray()
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                break
            if not data:
                break
            buffer += data
            while len(buffer) >= 9:
                hi, lo, kind, _flags, _sid = _HEADER.unpack_from(buffer)
                length = (hi << 16) | lo
                if len(buffer) < 9 + length:
                    break
                payload = bytes(buffer[9:9 + length])
                del buffer[:9 + length]
                types.append(kind)
                if kind == GOAWAY:
                    return struct.unpack(">LL", payload[:8])[1], bytes(types)
        return None, bytes(types)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
