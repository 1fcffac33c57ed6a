"""A plug-in CA, as Istio's ``cacerts`` Secret holds one: the CA signs with an
intermediate, and the root's key stays offline.

    ca-cert.pem     the intermediate the CA signs with (a CA certificate)
    ca-key.pem      its private key (0600; 0640 at most, as for an online root)
    cert-chain.pem  ca-cert.pem, then any further intermediates, up to (and
                    possibly including) the root
    root-cert.pem   the trust bundle: one or more self-signed roots, one of which
                    cert-chain.pem leads to (several during a root rotation)

Loading is strict, and every refusal names the file: a key that is not the
certificate's, a chain that does not start at ca-cert.pem or does not lead to a
root in root-cert.pem, a signing certificate that is no CA or is not valid now.
The CA never starts from material that would issue certificates nobody trusts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from identity.ca_store import CaStateError, load_key
from identity.certs import spki

CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CHAIN_FILE = "cert-chain.pem"
ROOTS_FILE = "root-cert.pem"
PLUGIN_FILES = (CA_CERT_FILE, CA_KEY_FILE, CHAIN_FILE, ROOTS_FILE)


@dataclass(frozen=True)
class SigningMaterial:
    """What a CA signs with, and what its leaves chain up to.

    ``issuer_chain`` goes after every leaf it signs (the signing certificate
    first, then further intermediates, never a root); ``roots`` is the trust
    bundle, which the leaves' chains verify against.
    """

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    issuer_chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]


def load_plugin(state_dir: Path, now: datetime) -> SigningMaterial:
    """The four files of a plug-in CA in ``state_dir``; ``CaStateError`` naming the
    file that is missing or wrong."""
    missing = [name for name in PLUGIN_FILES if not (state_dir / name).exists()]
    if missing:
        raise CaStateError(f"{state_dir / missing[0]}: missing; a plug-in CA needs "
                           f"{', '.join(PLUGIN_FILES)}")
    cert = _one_cert(state_dir / CA_CERT_FILE)
    key = load_key(state_dir / CA_KEY_FILE)
    if spki(key.public_key()) != spki(cert.public_key()):
        raise CaStateError(f"{state_dir / CA_KEY_FILE} is not the private key of "
                           f"{state_dir / CA_CERT_FILE}")
    _check_can_sign(cert, state_dir / CA_CERT_FILE, now)
    chain = load_certs(state_dir / CHAIN_FILE)
    if chain[0] != cert:
        raise CaStateError(f"{state_dir / CHAIN_FILE} does not start with "
                           f"{state_dir / CA_CERT_FILE}")
    roots = load_roots(state_dir / ROOTS_FILE)
    issuers = [c for c in chain if not _self_signed(c)]
    _check_leads_to_a_root(issuers, roots, state_dir / CHAIN_FILE, state_dir / ROOTS_FILE)
    return SigningMaterial(key, cert, tuple(issuers), roots)


def load_roots(path: Path) -> tuple[x509.Certificate, ...]:
    """A trust bundle file: one or more self-signed CA certificates."""
    roots = load_certs(path)
    for root in roots:
        if not _self_signed(root) or not _is_ca(root):
            raise CaStateError(f"{path}: {_name(root)} is not a self-signed CA certificate")
    return tuple(dict.fromkeys(roots))


def load_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (ValueError, x509.InvalidVersion) as exc:
        raise CaStateError(f"{path} is not a PEM certificate file: {exc}") from exc
    return certs


def _one_cert(path: Path) -> x509.Certificate:
    certs = load_certs(path)
    if len(certs) != 1:
        raise CaStateError(f"{path} holds {len(certs)} certificates; expected one")
    return certs[0]


def _check_can_sign(cert: x509.Certificate, path: Path, now: datetime) -> None:
    if not _is_ca(cert):
        raise CaStateError(f"{path} is not a CA certificate (basicConstraints CA:TRUE "
                           "with keyCertSign is required)")
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise CaStateError(f"{path} is not valid now ({cert.not_valid_before_utc} .. "
                           f"{cert.not_valid_after_utc})")


def _check_leads_to_a_root(issuers: list[x509.Certificate],
                           roots: tuple[x509.Certificate, ...], chain_path: Path,
                           roots_path: Path) -> None:
    for child, parent in itertools.pairwise(issuers):
        if not _issued_by(child, parent):
            raise CaStateError(f"{chain_path}: {_name(child)} is not signed by the next "
                               f"certificate, {_name(parent)}")
    if not any(_issued_by(issuers[-1], root) for root in roots):
        raise CaStateError(f"{chain_path} does not lead to a root in {roots_path}")


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    try:
        same = cert.subject == cert.issuer
    except (ValueError, TypeError):  # names are decoded lazily, and may not decode
        return False
    return same and _issued_by(cert, cert)


def _name(cert: x509.Certificate) -> str:
    try:
        return repr(cert.subject.rfc4514_string())
    except (ValueError, TypeError):
        return f"the certificate with serial {cert.serial_number:x} (subject unreadable)"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, x509.UnsupportedGeneralNameType,
            ValueError):
        return False
    return basic.ca and usage.key_cert_sign
