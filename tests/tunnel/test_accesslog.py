"""The access log: one line per closed connection, through the stdlib logger."""

from __future__ import annotations

import json
import logging

import pytest

from trellis.logging import JsonFormatter
from tunnel.accesslog import ConnectionRecord, log_connection

pytestmark = pytest.mark.unit


def _record(**changes: object) -> ConnectionRecord:
    base: dict[str, object] = dict(
        direction="outbound", protocol="hbone", src_addr="198.18.1.10:40000",
        dst_addr="198.18.2.10:8080", src_workload="bench/client", dst_workload=None,
        src_identity="spiffe://cluster.local/ns/bench/sa/client", dst_identity=None,
        dst_service=None, bytes_to_dst=50, bytes_from_dst=1105, duration_ms=1.5)
    base.update(changes)
    return ConnectionRecord(**base)  # type: ignore[arg-type]


def test_a_line_carries_every_field_that_is_set(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trellis.access"):
        log_connection(_record())
    (record,) = caplog.records
    assert record.name == "trellis.access"
    assert record.levelno == logging.INFO
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "connection closed"
    assert line["src_workload"] == "bench/client"
    assert line["bytes_from_dst"] == 1105
    assert "dst_workload" not in line and "error" not in line and "policy" not in line


def test_an_error_is_a_warning_with_its_policy(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trellis.access"):
        log_connection(_record(error="denied: no ALLOW policy matched", policy="bench/allow"))
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    line = json.loads(JsonFormatter().format(record))
    assert line["error"].startswith("denied") and line["policy"] == "bench/allow"


def test_nothing_is_built_when_the_level_is_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="trellis.access"):
        log_connection(_record(error="reset"))
    assert caplog.records == []
