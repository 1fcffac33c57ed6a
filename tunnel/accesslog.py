"""One structured line per closed connection, like ztunnel's access log.

This runs once per connection on both proxies, so it skips what the stdlib
would spend on every line: ``dataclasses.asdict`` (a recursive deep copy) and
``Logger.findCaller`` (a stack walk whose file and line nobody reads: the
logger name already says where the line comes from).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

_log = logging.getLogger("trellis.access")
_MESSAGE = "connection closed"


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


_FIELDS = tuple(f.name for f in fields(ConnectionRecord))


def log_connection(record: ConnectionRecord) -> None:
    level = logging.WARNING if record.error else logging.INFO
    if not _log.isEnabledFor(level):
        return
    values = {}
    for name in _FIELDS:
        value = getattr(record, name)
        if value is not None:
            values[name] = value
    _log.handle(_log.makeRecord(_log.name, level, "", 0, _MESSAGE, (), None,
                                extra={"fields": values}))
