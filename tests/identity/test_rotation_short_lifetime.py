"""Short certificate lifetimes (the lab's ``--cert-ttl``) against the CA's backdating.

The CA starts every leaf CLOCK_SKEW (one minute) in the past. Half of
[not_before, not_after] of a one-minute certificate is therefore over the
moment it arrives; counted that way, renewal became a loop of "past its
half-life" failures and backoff. Half-life now counts from arrival, within the
backdate the CA explains.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from identity_support import BACKEND, NOW
from test_cert_rotation import FakeCa, FakeTime, run

from identity.ca import CLOCK_SKEW
from identity.certs import CertBundle
from identity.rotation import CertificateManager, next_attempt_delay, renewal_due

pytestmark = pytest.mark.unit

MINUTE = timedelta(minutes=1)


def _backdated(lifetime: timedelta) -> CertBundle:
    """What the CA issues at NOW: valid from a minute before."""
    return CertBundle(BACKEND, b"cert", b"key", b"root", NOW - CLOCK_SKEW, NOW + lifetime)


def test_a_one_minute_certificate_is_renewed_30_s_after_it_arrived() -> None:
    bundle = _backdated(MINUTE)
    assert renewal_due(bundle, NOW) == NOW + timedelta(seconds=30)
    assert next_attempt_delay(bundle, NOW, 0, received=NOW) == 30.0
    # Counted from not_before, as before, it would be due on arrival.
    assert bundle.renew_at == NOW


def test_a_long_lifetime_keeps_its_half_life_within_the_backdate() -> None:
    bundle = _backdated(timedelta(hours=24))
    assert renewal_due(bundle, NOW) == NOW + timedelta(hours=12)
    assert renewal_due(bundle, None) == bundle.renew_at  # no arrival time: as before


def test_a_certificate_later_in_its_life_than_the_backdate_explains_is_still_late() -> None:
    # A CA clock 18 h behind: only the one-minute backdate is forgiven, so the
    # certificate is past its half-life and the manager backs off (not spins).
    bundle = CertBundle(BACKEND, b"cert", b"key", b"root", NOW - timedelta(hours=18),
                        NOW + timedelta(hours=6))
    start = bundle.not_before + CLOCK_SKEW
    assert renewal_due(bundle, NOW) == start + (bundle.not_after - start) / 2 < NOW
    assert next_attempt_delay(bundle, NOW, 0, received=NOW) == 0.0


def test_the_manager_renews_one_minute_certificates_every_30_s_without_a_failure() -> None:
    async def scenario(time: FakeTime, ca: FakeCa, manager: CertificateManager) -> None:
        # As identity.ca issues them: valid from a minute ago until a minute from now
        # (the fake CA counts its lifetime from the backdated start).
        ca.lifetime, ca.backdate = MINUTE + CLOCK_SKEW, CLOCK_SKEW
        manager.track(BACKEND)
        await time.advance(95)
        # Before the fix: [0, 0.5, 1.5, 3.5, 7.5, …], every certificate a "failure".
        assert ca.call_offsets() == [0, 30, 60, 90]
        assert manager.current(BACKEND) is not None

    run(scenario)
