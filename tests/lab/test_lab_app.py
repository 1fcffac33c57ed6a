"""The demo app on loopback: who it is, whom it saw, bodies counted, connections kept alive."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from lab.app import DemoServer, main, make_server

pytestmark = pytest.mark.inprocess


@pytest.fixture
def server() -> Iterator[DemoServer]:
    srv = make_server("backend-2", "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def connect(srv: DemoServer) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=5)


def test_get_answers_pod_peer_and_path(server: DemoServer) -> None:
    conn = connect(server)
    conn.request("GET", "/hello?x=1")
    response = conn.getresponse()
    answer = json.loads(response.read())
    local_port = conn.sock.getsockname()[1]
    conn.close()
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/json"
    assert answer == {"pod": "backend-2", "peer": f"127.0.0.1:{local_port}", "path": "/hello?x=1"}


def test_requests_share_one_keep_alive_connection(server: DemoServer) -> None:
    conn = connect(server)
    ports = set()
    for path in ("/1", "/2", "/3"):
        conn.request("GET", path)
        answer = json.loads(conn.getresponse().read())
        ports.add(answer["peer"])
        assert answer["path"] == path
    conn.close()
    assert len(ports) == 1


def test_post_and_put_bodies_are_read_and_counted(server: DemoServer) -> None:
    conn = connect(server)
    conn.request("POST", "/up", body=b"x" * 300_000)
    assert json.loads(conn.getresponse().read())["body_bytes"] == 300_000
    conn.request("PUT", "/up", body=b"")
    assert json.loads(conn.getresponse().read())["body_bytes"] == 0
    conn.close()


def test_chunked_bodies_are_counted(server: DemoServer) -> None:
    conn = connect(server)
    conn.request("POST", "/chunks", body=iter([b"abc", b"defgh"]), encode_chunked=True)
    assert json.loads(conn.getresponse().read())["body_bytes"] == 8
    conn.request("GET", "/after")  # the connection is still in step after the chunked body
    assert json.loads(conn.getresponse().read())["path"] == "/after"
    conn.close()


def test_a_taken_port_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--name", "frontend-1", "--host", "127.0.0.1", "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"lab.app: error: frontend-1: port {port}: already in use\n")
