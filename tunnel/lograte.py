"""Log lines that an attacker can trigger, at a bounded rate.

A peer that makes the proxy refuse or close connections can make it do so
thousands of times a second; one line each would fill the disk and cost more
CPU than the refusal itself. The metric counts every event; the log keeps one
line per key per interval, and the next line says how many were left out.

Keys must come from a fixed set (an enum value, a setting's name), never from
what a peer sent, so the table of keys stays small.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Mapping

DEFAULT_INTERVAL_S = 10.0


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, *, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._next_at: dict[Hashable, float] = {}
        self._dropped: dict[Hashable, int] = {}

    def log(self, level: int, key: Hashable, message: str,
            fields: Mapping[str, object]) -> bool:
        """Log ``message`` unless ``key`` logged within the interval; True if it did."""
        now = time.monotonic()
        if now < self._next_at.get(key, 0.0):
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        self._next_at[key] = now + self._interval_s
        dropped = self._dropped.pop(key, 0)
        values = dict(fields)
        if dropped:
            values["suppressed_since_last"] = dropped
        self._logger.log(level, message, extra={"fields": values})
        return True
