"""What an anonymous flood can make the CA do: bounded by token buckets and a cap on
concurrent authentications, answered 429 with Retry-After, counted; never a
TokenReview beyond the limits."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import timedelta

import pytest
from identity_support import StaticRegistry, raw, scrape

from identity.ca import CertificateAuthority
from identity.ca_limits import LimitReason, SignGate, SignLimits
from identity.ca_server import CaServer, CaServerConfig, serve_ca
from identity.node_auth import AuthenticationFailed

SIGN_BODY = json.dumps({"csr": "not yet"}).encode()


# -- the gate, with a hand-driven clock ------------------------------------------------

@pytest.mark.unit
def test_a_source_gets_its_burst_then_its_rate() -> None:
    gate = SignGate(SignLimits(per_source_rate=2.0, per_source_burst=3, global_burst=100,
                               max_concurrent=100))
    assert [gate.admit("10.0.0.1", 0.0) for _ in range(3)] == [None] * 3
    refused = gate.admit("10.0.0.1", 0.0)
    assert refused is not None and refused.reason is LimitReason.SOURCE_RATE
    assert refused.retry_after_s == 1
    assert gate.admit("10.0.0.2", 0.0) is None  # another source has its own bucket
    assert gate.admit("10.0.0.1", 0.5) is None  # 0.5 s at 2/s is one more
    assert gate.admit("10.0.0.1", 0.5) is not None


@pytest.mark.unit
def test_the_global_bucket_bounds_many_sources_together() -> None:
    gate = SignGate(SignLimits(per_source_burst=5, global_rate=1.0, global_burst=4,
                               max_concurrent=100))
    assert [gate.admit(f"10.0.0.{i}", 0.0) for i in range(4)] == [None] * 4
    refused = gate.admit("10.0.0.99", 0.0)
    assert refused is not None and refused.reason is LimitReason.GLOBAL_RATE


@pytest.mark.unit
def test_concurrency_is_capped_until_done() -> None:
    gate = SignGate(SignLimits(max_concurrent=2))
    assert gate.admit("a", 0.0) is None and gate.admit("b", 0.0) is None
    refused = gate.admit("c", 0.0)
    assert refused is not None and refused.reason is LimitReason.CONCURRENCY
    gate.done()
    assert gate.admit("c", 0.0) is None


@pytest.mark.unit
def test_the_source_table_is_bounded() -> None:
    gate = SignGate(SignLimits(max_sources=100, global_burst=10_000, max_concurrent=10_000))
    for i in range(5_000):
        gate.admit(f"10.{i // 256}.{i % 256}.1", 0.0)
        gate.done()
    assert gate.tracked_sources == 100


@pytest.mark.unit
@pytest.mark.parametrize("setting", ["per_source_rate", "global_rate", "per_source_burst",
                                     "max_sources", "max_concurrent"])
def test_bad_limits_name_the_setting(setting: str) -> None:
    with pytest.raises(ValueError, match=f"SignLimits.{setting}"):
        SignLimits(**{setting: 0})


# -- the server: floods from one source, and slow reviews --------------------------------

class CountingAuthenticator:
    """Every call stands for one TokenReview; ``hold`` makes them wait."""

    def __init__(self) -> None:
        self.calls = 0
        self.hold = threading.Event()
        self.hold.set()
        self._lock = threading.Lock()

    def authenticate(self, token: str | None) -> str:
        with self._lock:
            self.calls += 1
        self.hold.wait(10)
        raise AuthenticationFailed("token rejected by TokenReview")


def _serve(ca: CertificateAuthority, limits: SignLimits, authenticator: CountingAuthenticator,
           scenario) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        config = CaServerConfig(host="127.0.0.1", port=0, lifetime=timedelta(hours=1),
                                metrics_port=0, limits=limits)
        async with await serve_ca(config, ca, StaticRegistry(frozenset()), authenticator) as server:
            await scenario(server)
    asyncio.run(main())


@pytest.mark.inprocess
def test_an_anonymous_flood_costs_at_most_the_burst_in_token_reviews(
        ca: CertificateAuthority) -> None:
    auth = CountingAuthenticator()
    limits = SignLimits(per_source_rate=0.01, per_source_burst=5)

    async def scenario(server: CaServer) -> None:
        headers = (("Authorization", "Bearer forged"),)
        statuses = [(await raw(server, ca, "POST", "/v1/sign", SIGN_BODY, headers))
                    for _ in range(30)]
        assert [r.status for r in statuses] == [401] * 5 + [429] * 25
        assert statuses[-1].header("retry-after") is not None
        assert int(statuses[-1].header("retry-after") or 0) >= 1
        assert auth.calls == 5  # the control for "no more": the first five did cost one
        metrics = await scrape(server)
        assert 'trellis_ca_sign_limited_total{reason="source_rate"} 25.0' in metrics
        assert (await raw(server, ca, "GET", "/healthz")).status == 200  # not limited

    _serve(ca, limits, auth, scenario)


@pytest.mark.inprocess
def test_concurrent_reviews_are_capped(ca: CertificateAuthority) -> None:
    auth = CountingAuthenticator()
    auth.hold.clear()
    limits = SignLimits(max_concurrent=2, per_source_burst=100)

    async def scenario(server: CaServer) -> None:
        slow = asyncio.gather(*(raw(server, ca, "POST", "/v1/sign", SIGN_BODY)
                                for _ in range(2)))
        async with asyncio.timeout(5):
            while auth.calls < 2:  # both are inside authenticate, holding their slots
                await asyncio.sleep(0.01)
        third = await raw(server, ca, "POST", "/v1/sign", SIGN_BODY)
        assert third.status == 429 and third.header("retry-after") == "1"
        auth.hold.set()
        assert [r.status for r in await slow] == [401, 401]
        assert auth.calls == 2
        # Slots come back once requests finish.
        assert (await raw(server, ca, "POST", "/v1/sign", SIGN_BODY)).status == 401
        assert 'trellis_ca_sign_limited_total{reason="concurrency"} 1.0' in await scrape(server)

    _serve(ca, limits, auth, scenario)
