"""One structured line per closed connection, like ztunnel's access log."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

_log = logging.getLogger("trellis.access")


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    direction: str            # "outbound" | "inbound"
    protocol: str             # "hbone" | "tcp" (plaintext or passthrough)
    src_addr: str
    dst_addr: str
    src_workload: str | None
    dst_workload: str | None
    src_identity: str | None
    dst_identity: str | None
    dst_service: str | None
    bytes_to_dst: int
    bytes_from_dst: int
    duration_ms: float
    error: str | None = None
    policy: str | None = None


def log_connection(record: ConnectionRecord) -> None:
    fields = {k: v for k, v in asdict(record).items() if v is not None}
    level = logging.WARNING if record.error else logging.INFO
    _log.log(level, "connection closed", extra={"fields": fields})
