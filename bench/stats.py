"""Pure statistics for the benchmark: percentiles of latency samples, and the
median/min/max summary every reported figure carries across repetitions.

No I/O here, so the numbers the table and the JSON show are unit-tested.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """One figure over the repetitions: the median, with min and max beside it."""

    median: float
    min: float
    max: float

    def to_json(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max}


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest-rank on the sorted samples.

    Nearest rank (not interpolation) so that a reported p99 is a latency some
    request really had, as HdrHistogram-style tools report it.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def summarize(values: Sequence[float | None]) -> Summary | None:
    """Median/min/max of the repetitions that produced a figure; None when none did."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Summary(median(present), min(present), max(present))
