"""How much signing work anyone can make the CA do: token buckets and a cap on reviews.

Every ``POST /v1/sign`` may cost a TokenReview at the Kubernetes API server
before the CA knows whether the caller is a node agent at all, so an anonymous
flood would turn into a flood against the API server. Before any of that work:

- a token bucket per source IP (a node agent renews one certificate per service
  account on its node, at half-life, so its bursts are small and rare), in a
  table bounded by ``max_sources`` (least recently seen evicted first; an
  evicted source only gets a fresh bucket, and the global bucket still holds);
- one global bucket, so that many sources together are bounded too;
- at most ``max_concurrent`` requests being authenticated and signed at once.

A refusal says when to come back (``Retry-After``) and is counted by reason.
Pure: the caller passes the time, so tests need no clock.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from dataclasses import dataclass


class LimitReason(enum.Enum):
    SOURCE_RATE = "source_rate"
    GLOBAL_RATE = "global_rate"
    CONCURRENCY = "concurrency"


@dataclass(frozen=True, slots=True)
class SignLimits:
    per_source_rate: float = 2.0  # requests per second, refilled continuously
    per_source_burst: int = 40
    global_rate: float = 50.0
    global_burst: int = 200
    max_sources: int = 4096
    max_concurrent: int = 8

    def __post_init__(self) -> None:
        for name in ("per_source_rate", "global_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SignLimits.{name}: {getattr(self, name)} must be > 0")
        for name in ("per_source_burst", "global_burst", "max_sources", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ValueError(f"SignLimits.{name}: {getattr(self, name)} must be >= 1")


@dataclass(frozen=True, slots=True)
class Refused:
    reason: LimitReason
    retry_after_s: int  # whole seconds, at least 1, as the header carries them


class _Bucket:
    __slots__ = ("level", "updated")

    def __init__(self, level: float, now: float) -> None:
        self.level = level
        self.updated = now

    def refill(self, now: float, rate: float, burst: int) -> None:
        self.level = min(float(burst), self.level + max(0.0, now - self.updated) * rate)
        self.updated = now

    def wait_for_one(self, rate: float) -> int:
        return max(1, math.ceil((1.0 - self.level) / rate))


class SignGate:
    """Admits a signing request, or says why not; ``done`` ends an admitted one."""

    def __init__(self, limits: SignLimits | None = None) -> None:
        self.limits = limits or SignLimits()
        self._sources: OrderedDict[str, _Bucket] = OrderedDict()
        self._global: _Bucket | None = None
        self.in_flight = 0

    def admit(self, source: str, now: float) -> Refused | None:
        lim = self.limits
        if self.in_flight >= lim.max_concurrent:
            return Refused(LimitReason.CONCURRENCY, 1)
        mine = self._source_bucket(source, now)
        mine.refill(now, lim.per_source_rate, lim.per_source_burst)
        if mine.level < 1.0:
            return Refused(LimitReason.SOURCE_RATE, mine.wait_for_one(lim.per_source_rate))
        everyone = self._global or _Bucket(float(lim.global_burst), now)
        self._global = everyone
        everyone.refill(now, lim.global_rate, lim.global_burst)
        if everyone.level < 1.0:
            return Refused(LimitReason.GLOBAL_RATE, everyone.wait_for_one(lim.global_rate))
        mine.level -= 1.0
        everyone.level -= 1.0
        self.in_flight += 1
        return None

    def done(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    @property
    def tracked_sources(self) -> int:
        return len(self._sources)

    def _source_bucket(self, source: str, now: float) -> _Bucket:
        bucket = self._sources.get(source)
        if bucket is not None:
            self._sources.move_to_end(source)
            return bucket
        while len(self._sources) >= self.limits.max_sources:
            self._sources.popitem(last=False)
        bucket = self._sources[source] = _Bucket(float(self.limits.per_source_burst), now)
        return bucket
