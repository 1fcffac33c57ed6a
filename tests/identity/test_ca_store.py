"""`CertificateAuthority.load_or_create`: the root survives restarts, bad state is named."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from identity_support import BACKEND

from identity.ca import CertificateAuthority
from identity.ca_store import CERT_FILE, KEY_FILE, CaStateError

pytestmark = pytest.mark.unit


def test_creates_then_reloads_the_same_root(tmp_path: Path) -> None:
    state = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(state)
    assert stat.S_IMODE((state / KEY_FILE).stat().st_mode) == 0o600
    assert (state / CERT_FILE).read_bytes() == first.root_pem
    second = CertificateAuthority.load_or_create(state)
    assert second.root_pem == first.root_pem
    # The reloaded key really is the root key: its leaves chain to the first root.
    leaf = second.issue(BACKEND).leaf
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(first.root_pem))


@pytest.mark.parametrize("present", [CERT_FILE, KEY_FILE])
def test_one_file_without_the_other_is_an_error(tmp_path: Path, present: str) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    missing = KEY_FILE if present == CERT_FILE else CERT_FILE
    (tmp_path / missing).unlink()
    with pytest.raises(CaStateError, match=f"{present} exists but .*{missing} does not"):
        CertificateAuthority.load_or_create(tmp_path)
    assert not (tmp_path / missing).exists(), "must not mint a replacement root"


def test_a_cert_that_is_not_pem_is_named(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / CERT_FILE).write_text("not a certificate")
    with pytest.raises(CaStateError, match=f"{CERT_FILE} is not a PEM certificate"):
        CertificateAuthority.load_or_create(tmp_path)


def test_a_key_that_is_not_pem_is_named(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / KEY_FILE).write_text("not a key")
    with pytest.raises(CaStateError, match=f"{KEY_FILE} is not an unencrypted PEM private key"):
        CertificateAuthority.load_or_create(tmp_path)


def test_a_readable_key_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    with pytest.raises(CaStateError, match="has mode 0644; the root key must be 0600"):
        CertificateAuthority.load_or_create(tmp_path)


@pytest.mark.parametrize("mode", [0o660, 0o604, 0o620])
def test_a_key_others_can_read_or_change_is_refused(tmp_path: Path, mode: int) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / KEY_FILE).chmod(mode)
    with pytest.raises(CaStateError, match=f"has mode {mode:04o}"):
        CertificateAuthority.load_or_create(tmp_path)


def test_a_group_readable_key_as_a_secret_under_fs_group_is_loaded(tmp_path: Path) -> None:
    made = CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o440)
    assert CertificateAuthority.load_or_create(tmp_path).root_pem == made.root_pem


def test_a_key_from_another_root_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path / "a")
    CertificateAuthority.load_or_create(tmp_path / "b")
    (tmp_path / "a" / KEY_FILE).write_bytes((tmp_path / "b" / KEY_FILE).read_bytes())
    with pytest.raises(CaStateError, match="is not the private key of"):
        CertificateAuthority.load_or_create(tmp_path / "a")


def test_a_root_for_another_trust_domain_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, trust_domain="one.local")
    with pytest.raises(CaStateError, match=r"trust domain 'one\.local', not 'cluster\.local'"):
        CertificateAuthority.load_or_create(tmp_path, trust_domain="cluster.local")
