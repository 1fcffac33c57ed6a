"""Keep one valid certificate per identity: fetch, renew at half-life, back off on failure.

Each tracked identity has one worker task that loops: wait until
`next_attempt_delay` says so (or until someone needs the certificate now),
fetch, publish. A failed fetch never drops the certificate we hold: it stays
in use while it is valid, and we retry 0.5 s, 1 s, 2 s … capped at 150 s, with
jitter so that every agent does not hit a recovering CA at the same instant.

Half-life is counted from when the certificate *arrived*, as Istio's agent
counts it, but only within the CA's deliberate backdating (identity.ca
backdates `not_before` by CLOCK_SKEW): with a short lifetime such as the lab's
`--cert-ttl 1m`, half of [not_before, not_after] would already be over on
arrival, and renewal would turn into a retry loop. A certificate that arrives
later in its life than the backdate explains (a CA whose clock runs behind) is
still treated as a failure and backed off.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from identity.ca import CLOCK_SKEW
from identity.certs import CertBundle, utcnow
from identity.spiffe import Identity

log = logging.getLogger("trellis.identity")

FIRST_RETRY = 0.5
MAX_RETRY = 150.0
JITTER = 0.2  # retries land in [0.8, 1.0] x the backoff step: spread out, cap kept

Fetch = Callable[[Identity], Awaitable[CertBundle]]
Subscriber = Callable[[CertBundle], None]


def renewal_due(bundle: CertBundle, received: datetime | None = None,
                backdate: timedelta = CLOCK_SKEW) -> datetime:
    """When to renew `bundle`: half-way from its start to `not_after`, where the start
    is when it was `received`, moved back no earlier than `not_before` and no later
    than `not_before + backdate` (what the CA's backdating explains). Pure."""
    start = bundle.not_before
    if received is not None:
        start = min(max(received, bundle.not_before), bundle.not_before + backdate)
    return start + (bundle.not_after - start) / 2


def next_attempt_delay(bundle: CertBundle | None, now: datetime, consecutive_failures: int,
                       jitter: float = 0.0, *, received: datetime | None = None) -> float:
    """Seconds until the next fetch. Pure: `jitter` is a uniform draw in [0, 1).

    - failures: exponential backoff from the first retry, whatever we hold;
    - no certificate yet: now;
    - otherwise: at the certificate's half-life, counted from when it was
      `received` (`renewal_due`; now, if that has passed).
    """
    if consecutive_failures < 0 or not 0.0 <= jitter < 1.0:
        raise ValueError(f"consecutive_failures={consecutive_failures} must be >= 0 and "
                         f"jitter={jitter} in [0, 1)")
    if consecutive_failures > 0:
        # The exponent is capped before 2**n, so a long outage cannot overflow.
        step = min(MAX_RETRY, FIRST_RETRY * 2.0 ** min(consecutive_failures - 1, 16))
        return step * (1.0 - JITTER * jitter)
    if bundle is None:
        return 0.0
    return max(0.0, (renewal_due(bundle, received) - now).total_seconds())


class Cancellable(Protocol):
    def cancel(self) -> None: ...


# Schedules a callback after a delay; `loop.call_later` in production, a fake in tests.
CallLater = Callable[[float, Callable[[], None]], Cancellable]


@dataclass
class _Tracked:
    """Mutable per-identity state, owned by the manager and its one worker."""

    bundle: CertBundle | None = None
    received: datetime | None = None  # when `bundle` arrived: its half-life counts from there
    failures: int = 0
    last_error: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    updated: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task[None] | None = None
    untracked: bool = False


class CertificateManager:
    def __init__(self, fetch: Fetch, *, clock: Callable[[], datetime] = utcnow,
                 call_later: CallLater | None = None,
                 jitter: Callable[[], float] = random.random) -> None:
        self._fetch = fetch
        self._clock = clock
        self._call_later = call_later
        self._jitter = jitter
        self._tracked: dict[Identity, _Tracked] = {}
        self._subscribers: list[Subscriber] = []
        self._retiring: set[asyncio.Task[None]] = set()  # untracked, cancelled, not yet done
        self._started = False

    def start(self) -> None:
        """Start workers for everything tracked so far; call from the running loop."""
        self._started = True
        for identity, state in self._tracked.items():
            self._spawn_worker(identity, state)

    async def stop(self) -> None:
        self._started = False
        workers = [s.worker for s in self._tracked.values() if s.worker is not None]
        workers += self._retiring
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for state in self._tracked.values():
            state.worker = None

    def track(self, identity: Identity) -> None:
        """Keep a certificate for `identity` from now on (fetched soon). Idempotent."""
        if identity in self._tracked:
            return
        state = _Tracked()
        self._tracked[identity] = state
        if self._started:
            self._spawn_worker(identity, state)

    def untrack(self, identity: Identity) -> None:
        state = self._tracked.pop(identity, None)
        if state is None:
            return
        state.untracked = True
        state.updated.set()  # wake waiting get()s so they fail instead of timing out
        if state.worker is not None:
            state.worker.cancel()
            self._retiring.add(state.worker)
            state.worker.add_done_callback(self._retiring.discard)

    def current(self, identity: Identity) -> CertBundle | None:
        """The certificate for `identity` if we hold one valid now, else None."""
        state = self._tracked.get(identity)
        if state is None or state.bundle is None or not state.bundle.is_valid(self._clock()):
            return None
        return state.bundle

    async def get(self, identity: Identity, timeout: float) -> CertBundle:
        """A valid certificate for `identity`, tracking and fetching it at once if need be."""
        if not self._started:
            raise RuntimeError("CertificateManager.get() before start()")
        self.track(identity)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    state = self._tracked.get(identity)
                    if state is None or state.untracked:
                        raise LookupError(f"{identity} was untracked while waiting for it")
                    if (bundle := self.current(identity)) is not None:
                        return bundle
                    # Someone needs it now: skip the scheduled wait (or backoff).
                    state.wake.set()
                    await state.updated.wait()
        except TimeoutError:
            state = self._tracked.get(identity)
            error = state.last_error if state else None
            raise TimeoutError(f"no certificate for {identity} within {timeout}s"
                               + (f"; last error: {error}" if error else "")) from None

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(bundle)` after each new certificate; returns an unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def _spawn_worker(self, identity: Identity, state: _Tracked) -> None:
        # The one place this module starts a task; the manager owns and cancels it.
        state.worker = asyncio.get_running_loop().create_task(
            self._run(identity, state), name=f"cert-rotation {identity}")

    async def _run(self, identity: Identity, state: _Tracked) -> None:
        while True:
            delay = next_attempt_delay(state.bundle, self._clock(), state.failures,
                                       self._jitter(), received=state.received)
            await self._sleep_unless_woken(delay, state.wake)
            try:
                bundle = await self._fetch(identity)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any fetch failure is retried; the cause is logged
                self._record_failure(identity, state, exc)
                continue
            now = self._clock()
            if not bundle.is_valid(now):
                self._record_failure(identity, state, ValueError(
                    f"fetched certificate is not valid now ({bundle.not_before.isoformat()} .. "
                    f"{bundle.not_after.isoformat()}); clocks out of sync?"))
                continue
            failures_before = state.failures
            self._publish(identity, state, bundle, now)
            due = renewal_due(bundle, now)
            if due <= now:
                # Already past half-life on arrival: renewing "now" would spin
                # against the CA, so count it as a failure and keep backing off.
                state.failures = failures_before
                self._record_failure(identity, state, ValueError(
                    f"fetched certificate is already past its half-life "
                    f"{due.isoformat()}"))

    async def _sleep_unless_woken(self, delay: float, wake: asyncio.Event) -> None:
        # Always yield once, so even a zero delay and a fetch that completes
        # without awaiting cannot starve the event loop.
        await asyncio.sleep(0)
        if delay > 0 and not wake.is_set():
            call_later = self._call_later or asyncio.get_running_loop().call_later
            timer = call_later(delay, wake.set)
            try:
                await wake.wait()
            finally:
                timer.cancel()
        wake.clear()

    def _record_failure(self, identity: Identity, state: _Tracked, exc: Exception) -> None:
        state.failures += 1
        state.last_error = f"{type(exc).__name__}: {exc}"
        held = state.bundle
        still_valid = held is not None and held.is_valid(self._clock())
        log.log(logging.WARNING if still_valid or held is None else logging.ERROR,
                "certificate fetch failed", extra={"fields": {
                    "identity": str(identity), "failures": state.failures,
                    "error": state.last_error, "holding_valid_certificate": still_valid,
                    "expires": held.not_after.isoformat() if held else None}})

    def _publish(self, identity: Identity, state: _Tracked, bundle: CertBundle,
                 received: datetime) -> None:
        state.bundle, state.received, state.failures, state.last_error = (
            bundle, received, 0, None)
        log.info("certificate renewed", extra={"fields": {
            "identity": str(identity), "not_after": bundle.not_after.isoformat(),
            "renew_at": renewal_due(bundle, received).isoformat()}})
        # Wake every get() waiting, then arm a fresh event for the next update.
        state.updated.set()
        state.updated = asyncio.Event()
        for callback in list(self._subscribers):
            try:
                callback(bundle)
            except Exception:  # a broken subscriber must not stop rotation for everyone
                log.exception("certificate subscriber failed",
                              extra={"fields": {"identity": str(identity)}})
