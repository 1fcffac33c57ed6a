"""Rotation: the pure schedule, and the manager driven by a fake clock and a fake CA."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from identity_support import BACKEND, FRONTEND, NOW

from identity.certs import CertBundle
from identity.rotation import MAX_RETRY, CertificateManager, next_attempt_delay
from identity.spiffe import Identity

pytestmark = pytest.mark.unit

DAY = timedelta(hours=24)


def bundle_at(start: datetime, lifetime: timedelta = DAY, tag: str = "") -> CertBundle:
    return CertBundle(BACKEND, tag.encode(), b"key", b"root", start, start + lifetime)


# --- the pure schedule -------------------------------------------------------------


def test_no_certificate_means_fetch_now() -> None:
    assert next_attempt_delay(None, NOW, 0) == 0.0


def test_a_certificate_is_renewed_at_half_life() -> None:
    bundle = bundle_at(NOW)
    assert next_attempt_delay(bundle, NOW, 0) == 12 * 3600
    assert next_attempt_delay(bundle, NOW + timedelta(hours=11), 0) == 3600
    assert next_attempt_delay(bundle, NOW + timedelta(hours=12), 0) == 0.0
    assert next_attempt_delay(bundle, NOW + timedelta(hours=30), 0) == 0.0


@pytest.mark.parametrize("bundle", [None, bundle_at(NOW)])
def test_backoff_doubles_from_half_a_second_to_150(bundle: CertBundle | None) -> None:
    delays = [next_attempt_delay(bundle, NOW, n) for n in range(1, 13)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 32, 64, 128, 150, 150, 150]


def test_backoff_stays_capped_for_very_long_outages() -> None:
    assert next_attempt_delay(None, NOW, 10**9) == MAX_RETRY


@given(failures=st.integers(min_value=1, max_value=10**6),
       jitter=st.floats(min_value=0, max_value=1, exclude_max=True),
       renewal_in=st.integers(min_value=-10**6, max_value=10**6))
def test_jitter_spreads_retries_below_the_step_and_never_past_the_cap(
        failures: int, jitter: float, renewal_in: int) -> None:
    bundle = bundle_at(NOW + timedelta(seconds=renewal_in) - DAY / 2)
    step = next_attempt_delay(bundle, NOW, failures)
    delay = next_attempt_delay(bundle, NOW, failures, jitter)
    assert 0.8 * step <= delay <= step <= MAX_RETRY
    assert delay >= 0.4


@given(failures=st.integers(min_value=1, max_value=60),
       jitter=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_backoff_never_shrinks_as_failures_grow(failures: int, jitter: float) -> None:
    assert next_attempt_delay(None, NOW, failures + 1, jitter) >= \
        next_attempt_delay(None, NOW, failures, jitter)


@pytest.mark.parametrize(("failures", "jitter"), [(-1, 0.0), (0, 1.0), (0, -0.1)])
def test_schedule_arguments_are_checked(failures: int, jitter: float) -> None:
    with pytest.raises(ValueError, match="consecutive_failures"):
        next_attempt_delay(None, NOW, failures, jitter)


# --- the manager -------------------------------------------------------------------


@dataclass
class _Timer:
    due: datetime
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeTime:
    """A clock plus `call_later` that only move when the test says so."""

    now: datetime = NOW
    timers: list[_Timer] = field(default_factory=list)

    def clock(self) -> datetime:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(self.now + timedelta(seconds=delay), callback)
        self.timers.append(timer)
        return timer

    async def advance(self, seconds: float) -> None:
        """Move time forward, firing due timers in order and letting tasks react."""
        target = self.now + timedelta(seconds=seconds)
        while True:
            await settle()
            due = [t for t in self.timers if not t.cancelled and t.due <= target]
            if not due:
                break
            first = min(due, key=lambda t: t.due)
            self.now = max(self.now, first.due)
            first.cancelled = True
            first.callback()
        self.now = target
        await settle()


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


@dataclass
class FakeCa:
    """Issues `lifetime` certificates from the fake clock's now, or fails when told to."""

    time: FakeTime
    failing: bool = False
    lifetime: timedelta = DAY
    backdate: timedelta = timedelta(0)
    calls: list[tuple[Identity, datetime]] = field(default_factory=list)

    async def fetch(self, identity: Identity) -> CertBundle:
        self.calls.append((identity, self.time.now))
        if self.failing:
            raise ConnectionError("CA is down")
        start = self.time.now - self.backdate
        return CertBundle(identity, f"cert-{len(self.calls)}".encode(), b"key", b"root",
                          start, start + self.lifetime)

    def call_offsets(self) -> list[float]:
        return [(at - NOW).total_seconds() for _, at in self.calls]


def run(scenario: Callable[[FakeTime, FakeCa, CertificateManager], Coroutine[Any, Any, None]]
        ) -> None:
    async def main() -> None:
        time = FakeTime()
        fake_ca = FakeCa(time)
        manager = CertificateManager(fake_ca.fetch, clock=time.clock,
                                     call_later=time.call_later, jitter=lambda: 0.0)
        manager.start()
        try:
            await scenario(time, fake_ca, manager)
        finally:
            await manager.stop()
    asyncio.run(main())


def test_tracking_fetches_at_once_and_renews_at_half_life() -> None:
    async def scenario(time: FakeTime, ca: FakeCa, manager: CertificateManager) -> None:
        updates: list[bytes] = []
        manager.subscribe(lambda bundle: updates.append(bundle.chain_pem))
        manager.track(BACKEND)
        await settle()
        first = manager.current(BACKEND)
        assert first is not None and first.chain_pem == b"cert-1"
        await time.advance(12 * 3600 - 1)
        assert len(ca.calls) == 1, "renewed before half-life"
        assert manager.current(BACKEND) is first
        await time.advance(1)
        assert ca.call_offsets() == [0, 12 * 3600]
        assert manager.current(BACKEND).chain_pem == b"cert-2"  # type: ignore[union-attr]
        assert updates == [b"cert-1", b"cert-2"]

    run(scenario)


def test_failures_back_off_keep_the_old_certificate_then_recover() -> None:
    async def scenario(time: FakeTime, ca: FakeCa, manager: CertificateManager) -> None:
        manager.track(BACKEND)
        await settle()
        old = manager.current(BACKEND)
        ca.failing = True
        await time.advance(12 * 3600 + 20)
        # Half-life, then retries 0.5, 1, 2, 4, 8 s apart.
        half = 12 * 3600
        assert ca.call_offsets() == [0, half, half + 0.5, half + 1.5, half + 3.5, half + 7.5,
                                     half + 15.5]
        assert manager.current(BACKEND) is old, "a failed renewal dropped a valid certificate"
        ca.failing = False
        await time.advance(16)  # the next retry is 16 s after the last failure
        assert ca.call_offsets()[-1] == half + 31.5
        fresh = manager.current(BACKEND)
        assert fresh is not None and fresh is not old and fresh.chain_pem == b"cert-8"
        await time.advance(3600)
        assert len(ca.calls) == 8, "kept retrying after recovering"

    run(scenario)


def test_backoff_reaches_the_cap_and_stays_there() -> None:
    async def scenario(time: FakeTime, ca: FakeCa, manager: CertificateManager) -> None:
        ca.failing = True
        manager.track(BACKEND)
        await time.advance(1000)
        offsets = ca.call_offsets()
        gaps = [b - a for a, b in itertools.pairwise(offsets)]
        assert gaps[:9] == [0.5, 1, 2, 4, 8, 16, 32, 64, 128]
        assert gaps[9:] and set(gaps[9:]) == {150}
        assert manager.current(BACKEND) is None

    run(scenario)


def test_an_expired_certificate_is_not_current_and_get_names_the_last_error() -> None:
    async def scenario(time: FakeTime, ca: FakeCa, manager: CertificateManager) -> None:
        manager.track(BACKEND)
        await settle()
        ca.failing = True
        await time.advance(DAY.total_seconds())
        assert manager.current(BACKEND) is None
        with pytest.raises(TimeoutError, match="last error: ConnectionError: CA is down"):
            await manager.get(BACKEND, timeout=0.05)

    run(scenario)


def test_get_fetches_an_untracked_identity_at_once() -> None:
    async def scenario(time: FakeTime, ca: FakeCa, manager: CertificateManager) -> None:
        bundle = await manager.get(FRONTEND, timeout=1)
        assert bundle.identity == FRONTEND
        assert ca.calls == [(FRONTEND, NOW)]
        assert await manager.get(FRONTEND, timeout=1) is bundle  # no second fetch
        assert len(ca.calls) == 1

    run(scenario)


def test_get_cuts_the_backoff_short_when_nothing_was_fetched_yet() -> None:
    async def scenario(time: FakeTime, ca: FakeCa, manager: CertificateManager) -> None:
        ca.failing = True
        manager.track(BACKEND)
        await settle()
        assert len(ca.calls) == 1
        ca.failing = False
        bundle = await manager.get(BACKEND, timeout=1)  # no time passes on the fake clock
        assert bundle.chain_pem == b"cert-2" and ca.call_offsets() == [0, 0]

    run(scenario)


def test_untrack_stops_renewal_and_fails_waiters() -> None:
    async def scenario(time: FakeTime, ca: FakeCa, manager: CertificateManager) -> None:
        ca.failing = True
        waiter = asyncio.ensure_future(manager.get(BACKEND, timeout=5))
        await settle()
        manager.untrack(BACKEND)
        with pytest.raises(LookupError, match="untracked while waiting"):
            await waiter
        calls = len(ca.calls)
        await time.advance(3600)
        assert len(ca.calls) == calls
        assert manager.current(BACKEND) is None

    run(scenario)


def test_a_certificate_already_past_half_life_backs_off_instead_of_spinning() -> None:
    async def scenario(time: FakeTime, ca: FakeCa, manager: CertificateManager) -> None:
        # The CA's clock runs 18 h behind: every certificate arrives 3/4 through its life.
        ca.backdate = timedelta(hours=18)
        manager.track(BACKEND)
        await time.advance(1)
        assert ca.call_offsets() == [0, 0.5], "renewal must back off, not spin"
        assert manager.current(BACKEND) is not None, "the certificate is still usable"

    run(scenario)


def test_a_broken_subscriber_does_not_stop_rotation() -> None:
    async def scenario(time: FakeTime, ca: FakeCa, manager: CertificateManager) -> None:
        def broken(bundle: CertBundle) -> None:
            raise RuntimeError("subscriber bug")
        seen: list[bytes] = []
        manager.subscribe(broken)
        unsubscribe = manager.subscribe(lambda b: seen.append(b.chain_pem))
        manager.track(BACKEND)
        await time.advance(12 * 3600)
        assert seen == [b"cert-1", b"cert-2"]
        unsubscribe()
        await time.advance(12 * 3600)
        assert seen == [b"cert-1", b"cert-2"] and len(ca.calls) == 3

    run(scenario)


def test_get_before_start_is_an_error() -> None:
    async def main() -> None:
        manager = CertificateManager(FakeCa(FakeTime()).fetch)
        with pytest.raises(RuntimeError, match="before start"):
            await manager.get(BACKEND, timeout=1)
    asyncio.run(main())
