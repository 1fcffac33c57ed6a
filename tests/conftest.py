"""Test tiers and the rule that root tests never silently skip in CI.

Tiers are markers: ``unit`` (pure), ``inprocess`` (loopback, real TLS),
``netns`` (root, a fresh network namespace per test) and ``e2e`` (the lab).
Outside CI a non-root run skips ``netns``/``e2e`` tests; in CI (``CI`` set) the
same situation is an error, because a skipped kernel test looks like a pass.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from identity.ca import CertificateAuthority
from identity.spiffe import DEFAULT_TRUST_DOMAIN

ROOT_MARKERS = ("netns", "e2e", "cluster")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root_items = [i for i in items if any(i.get_closest_marker(m) for m in ROOT_MARKERS)]
    if os.geteuid() == 0 or not root_items:
        return
    if _in_ci():
        raise pytest.UsageError(
            f"CI must run as root: {len(root_items)} namespace/e2e tests would be skipped")
    for item in root_items:
        item.add_marker(pytest.mark.skip(reason="needs root (runs in CI as root)"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI, a root-tier test that skipped itself (say, a missing tool) fails the run."""
    if not _in_ci():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    root_skips = [r for r in skipped if any(m in r.keywords for m in ROOT_MARKERS)]
    if root_skips:
        names = ", ".join(r.nodeid for r in root_skips[:5])
        print(f"\nERROR: {len(root_skips)} root/namespace tests skipped in CI: {names}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    """The one test CA (trust domain cluster.local), shared by every tier: a CA
    costs a key generation, and the tests only need it to sign."""
    return CertificateAuthority.create(trust_domain=DEFAULT_TRUST_DOMAIN)


@contextlib.contextmanager
def fresh_netns(prefix: str = "trl-t-") -> Iterator[str]:
    """A new, empty network namespace (loopback up), always deleted afterwards."""
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace for the test."""
    with fresh_netns() as name:
        yield name


@pytest.fixture
def peer_netns() -> Iterator[str]:
    """A second fresh namespace, for tests that need two ends."""
    with fresh_netns("trl-p-") as name:
        yield name
