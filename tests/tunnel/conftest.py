"""Fixtures for the tunnel tests: a real CA, workload certificates, a uvloop runner."""

from __future__ import annotations

import pytest

from identity.ca import CertificateAuthority
from identity.certs import CertBundle
from identity.spiffe import Identity

FRONTEND = Identity.of("default", "frontend")
BACKEND = Identity.of("default", "backend")


@pytest.fixture(scope="session")
def frontend_bundle(ca: CertificateAuthority) -> CertBundle:
    return ca.issue(FRONTEND)


@pytest.fixture(scope="session")
def backend_bundle(ca: CertificateAuthority) -> CertBundle:
    return ca.issue(BACKEND)


@pytest.fixture(scope="session")
def other_ca() -> CertificateAuthority:
    """A second mesh with its own root and trust domain."""
    return CertificateAuthority.create(trust_domain="other.example")
