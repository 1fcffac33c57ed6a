"""The CA's root on disk: `root-cert.pem` and `root-key.pem` (mode 0600) in one directory.

Loading is strict. A half-present or unreadable root is an error naming the
file, never a reason to mint a new root: a silently replaced root would make
every certificate already in the mesh untrusted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from identity.certs import private_key_pem, spki

CERT_FILE = "root-cert.pem"
KEY_FILE = "root-key.pem"
# Optional, in either mode: further roots to trust and publish beside the CA's own
# (the next root before signing switches to it, the old one after; see
# deploy/README.md, "Rotating the root").
EXTRA_ROOTS_FILE = "extra-roots.pem"


class CaStateError(Exception):
    """The CA state directory holds something we cannot use; the message names the file."""


def load(state_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The persisted root, or None when neither file exists yet."""
    cert_path, key_path = state_dir / CERT_FILE, state_dir / KEY_FILE
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if not have_cert and not have_key:
        return None
    if have_cert != have_key:
        present, missing = (cert_path, key_path) if have_cert else (key_path, cert_path)
        raise CaStateError(
            f"{present} exists but {missing} does not; restore the missing file or remove "
            f"both to create a new root (which invalidates every issued certificate)")
    cert = _load_cert(cert_path)
    key = load_key(key_path)
    if spki(cert.public_key()) != spki(key.public_key()):
        raise CaStateError(f"{key_path} is not the private key of {cert_path}")
    return cert, key


def save(state_dir: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """Write the root; the key is created 0600 from the start, never chmod-ed afterwards."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Key first: a crash between the two writes leaves a key without a cert,
    # which `load` reports, rather than a cert whose key is lost.
    _write_atomically(state_dir / KEY_FILE, private_key_pem(key), mode=0o600)
    _write_atomically(state_dir / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM),
                      mode=0o644)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise CaStateError(f"{path} is not a PEM certificate: {exc}") from exc


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o037:
        # Like ssh: a root key others can read or change is already compromised.
        # Group read alone is allowed: a Kubernetes Secret volume under a pod
        # fsGroup turns defaultMode 0400 into 0440 owned by that group, which only
        # the pod's own processes hold.
        raise CaStateError(f"{path} has mode {mode:04o}; the root key must be 0600 "
                           f"(0640 at most; chmod 600 {path})")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CaStateError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaStateError(f"{path} holds a {type(key).__name__}, not an EC private key")
    return key


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
