"""The SIGTERM drain: it ends when the last connection does, or at its deadline."""

from __future__ import annotations

import asyncio

import pytest

from nodeagent.drain import drain

pytestmark = pytest.mark.unit


def test_drain_returns_once_connections_are_gone() -> None:
    left = iter([3, 2, 1, 0])
    assert asyncio.run(drain(lambda: next(left), deadline_s=30)) == 0


def test_drain_gives_up_at_its_deadline() -> None:
    assert asyncio.run(drain(lambda: 4, deadline_s=0.2)) == 4


def test_no_deadline_means_no_wait() -> None:
    calls: list[int] = []

    def count() -> int:
        calls.append(1)
        return 7

    assert asyncio.run(drain(count, deadline_s=0)) == 7
    assert len(calls) == 1
