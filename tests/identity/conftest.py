"""Fixtures for the identity tests: CAs and a registry placing backend on node-1."""

from __future__ import annotations

import pytest
from identity_support import BACKEND, FRONTEND, NOW, StaticRegistry

from identity.ca import CertificateAuthority


@pytest.fixture(scope="session")
def fixed_ca() -> CertificateAuthority:
    """A CA whose clock always reads `NOW`, for exact validity checks."""
    return CertificateAuthority.create(clock=lambda: NOW)


@pytest.fixture
def registry() -> StaticRegistry:
    return StaticRegistry(frozenset({("node-1", BACKEND), ("node-2", FRONTEND)}))
