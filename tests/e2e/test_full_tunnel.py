"""A tunnel at its 100-stream limit while connections come and go: none may be lost.

Found by the rotation-under-load test: node-1's pool frees a stream slot as soon
as h2 closes the stream, but node-2 still counts that stream's CONNECT handler
until the handler returns (tunnel/hbone_io.py, ``_max_handlers`` = the stream
limit). A new stream in that gap is refused with REFUSED_STREAM ("all CONNECT
handlers of the connection busy"), and node-1's outbound resets the app's
connection instead of retrying, though RFC 9113 §8.7 says a refused stream
was not processed and may be retried. Here: 199 connections held from
frontend-1 to backend-2 (a full tunnel and one with one free slot), then new
connections one after another, each taking that last slot.
"""

from __future__ import annotations

import pytest

from tests.e2e.labctl import pod
from tests.e2e.podhttp import Loop, connection, request

pytestmark = pytest.mark.e2e

HELD = 199
CHURN = 300


@pytest.mark.xfail(strict=True, reason="REFUSED_STREAM at a tunnel's last slot resets the "
                   "app's connection (tunnel/hbone_io.py handler bound; outbound does not "
                   "retry): remove this marker with the fix")
def test_the_last_stream_slot_of_a_tunnel_loses_no_connection(lab: dict) -> None:
    client, server = pod("frontend-1"), pod("backend-2")
    held, churn = [], Loop("churn at the last slot")
    try:
        for _ in range(HELD):
            conn = connection(client["netns"], server["ip"])
            held.append(conn)
            request(conn, "/held", "backend-2")
        for _ in range(CHURN):
            try:
                conn = connection(client["netns"], server["ip"])
                try:
                    request(conn, "/churn", "backend-2")
                finally:
                    conn.close()
                churn.ok += 1
            except (OSError, AssertionError) as exc:
                churn.failed(f"{type(exc).__name__}: {exc}")
        for number, conn in enumerate(held):  # the held ones are still there, too
            request(conn, f"/held-again/{number}", "backend-2")
    finally:
        for conn in held:
            conn.close()
    print(f"full tunnel: {churn.ok}/{CHURN} new connections answered; {churn.failures[:3]}")
    assert churn.failures == [], churn.failures
