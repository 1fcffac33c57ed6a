"""The demo app every lab pod runs: answers who it is and whom it saw.

    python -m lab.app --name backend-2 --port 8080

Every request gets JSON ``{"pod": NAME, "peer": "IP:PORT", "path": PATH}``, where
peer is the TCP peer the app itself saw, which is how the lab shows that the
mesh keeps the client's source address. Requests with a body (POST, PUT …) are
read in full, counted and answered with ``"body_bytes"`` as well, so the app also
serves upload benchmarks. Connections are HTTP/1.1 keep-alive.

Standard library only: it must run in any pod namespace with nothing installed.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

CHUNK = 256 * 1024


class DemoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive by default
    # Header and body go out in one write, and without Nagle a keep-alive client
    # does not wait out a delayed ACK (40 ms) per request.
    disable_nagle_algorithm = True
    server_version = "trellis-lab-app"
    pod_name = "app"  # set per server by make_server()
    access_log = False

    def do_GET(self) -> None:
        self._answer(with_body=False)

    def do_HEAD(self) -> None:
        self._answer(with_body=False, head=True)

    def do_POST(self) -> None:
        self._answer(with_body=True)

    do_PUT = do_PATCH = do_DELETE = do_POST

    def _answer(self, *, with_body: bool, head: bool = False) -> None:
        answer: dict[str, object] = {
            "pod": self.pod_name,
            "peer": f"{self.client_address[0]}:{self.client_address[1]}",
            "path": self.path,
        }
        try:
            received = self._drain_body()
        except ValueError as exc:
            self.send_error(400, str(exc))
            return
        if with_body:
            answer["body_bytes"] = received
        payload = (json.dumps(answer) + "\n").encode()
        head_lines = (
            f"{self.protocol_version} 200 OK\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            f"Server: {self.server_version}\r\n"
            "\r\n"
        ).encode("latin-1")
        self.wfile.write(head_lines if head else head_lines + payload)
        self.log_request(200, len(payload))

    def _drain_body(self) -> int:
        """Read and count the request body (Content-Length or chunked), keeping nothing."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._drain_chunked()
        length_header = self.headers.get("Content-Length", "0")
        if not length_header.isdigit():
            raise ValueError(f"bad Content-Length {length_header!r}")
        return self._drain(int(length_header))

    def _drain(self, remaining: int) -> int:
        total = 0
        while remaining > 0:
            data = self.rfile.read(min(CHUNK, remaining))
            if not data:
                raise ValueError("body ended early")
            total += len(data)
            remaining -= len(data)
        return total

    def _drain_chunked(self) -> int:
        total = 0
        while True:  # ends at the zero-size chunk; each turn consumes input or raises
            size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise ValueError(f"bad chunk size {size_line!r}") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return total
            total += self._drain(size)
            self.rfile.readline(1024)  # the CRLF after the chunk

    def log_message(self, format: str, *args: object) -> None:
        if self.access_log:
            super().log_message(format, *args)


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True
    # Benchmarks open many connections at once; the default backlog of 5 drops SYNs.
    request_queue_size = 1024


def make_server(name: str, host: str, port: int, access_log: bool = False) -> DemoServer:
    handler = type("Handler", (DemoHandler,), {"pod_name": name, "access_log": access_log})
    return DemoServer((host, port), handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.app", description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="the pod name to answer with")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--access-log", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)
    try:
        server = make_server(args.name, args.host, args.port, args.access_log)
    except OSError as exc:
        why = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        print(f"lab.app: error: {args.name}: port {args.port}: {why}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever to return, so it cannot run on the
        # thread serving; a helper thread ends the loop.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"lab.app: {args.name} listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    with server:
        server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
