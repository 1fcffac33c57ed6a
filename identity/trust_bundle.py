"""The roots a proxy trusts, read from a file and followed as it changes.

On Kubernetes the file is the CA's ConfigMap (``trellis-ca-root-cert``, key
``root-cert.pem``) mounted as a volume. The kubelet updates such a volume in
place by writing a new hidden directory and swapping the ``..data`` symlink,
so the file's path stays, the inode behind it changes, and an inotify watch on
the old inode would hear nothing. ``BundleFile.check`` therefore compares the
identity (device, inode, size, mtime) of whatever the path resolves to now,
which catches that swap as well as an in-place write; ``follow`` runs it every
``interval_s`` (the kubelet itself propagates ConfigMap changes only about once
a minute, so polling every few seconds adds nothing noticeable).

A file that cannot be read or holds no usable root never replaces the bundle in
force: the proxy keeps trusting what it trusted, says why once per change, and
counts it. This is what lets a root rotation run without restarting any proxy:
add the new root to the bundle, wait, switch signing, remove the old root
(deploy/README.md, "Rotating the root").
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("trellis.identity.trust")

DEFAULT_INTERVAL_S = 2.0
MAX_BUNDLE_BYTES = 1024 * 1024  # a ConfigMap's own limit; more is no trust bundle


class TrustBundleError(ValueError):
    """A trust bundle we will not use; the message names the file."""


class Reload(enum.Enum):
    """Outcome of a change to the bundle file (the metric's label values)."""

    APPLIED = "applied"
    INVALID = "invalid"


@dataclass(frozen=True)
class TrustBundle:
    """One or more root certificates: PEM for OpenSSL, SHA-256 fingerprints (of the
    DER) to tell which root a verified chain ended at."""

    pem: bytes = field(repr=False)
    fingerprints: frozenset[bytes]

    @classmethod
    def parse(cls, data: bytes, source: str) -> TrustBundle:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except (ValueError, x509.InvalidVersion) as exc:
            raise TrustBundleError(f"{source}: no PEM certificate: {exc}") from None
        for number, cert in enumerate(certs, 1):
            if not _is_ca(cert):
                # Named by position: its subject is decoded lazily and may not decode
                # (found by tests/fuzz/fuzz_trust_bundle.py).
                raise TrustBundleError(f"{source}: certificate {number} of {len(certs)} is "
                                       "not a CA certificate")
        ders = [c.public_bytes(serialization.Encoding.DER) for c in certs]
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
        return cls(pem, frozenset(fingerprint(der) for der in ders))

    @classmethod
    def of_file(cls, path: Path) -> TrustBundle:
        return cls.parse(_read(path), str(path))

    def __len__(self) -> int:
        return len(self.fingerprints)


def fingerprint(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


class BundleFile:
    """The bundle at ``path`` as last read; ``check()`` reads it again if it changed."""

    def __init__(self, path: Path, *, registry: CollectorRegistry | None = None) -> None:
        self.path = path
        self._stamp = _stamp(path)
        self.current = TrustBundle.of_file(path)  # at start, an unusable file is fatal
        registry = registry or CollectorRegistry()
        self.reloads = Counter("trellis_trust_bundle_reloads", "Changes of the trust bundle "
                               "file, by outcome (invalid: the previous bundle stays).",
                               ["result"], registry=registry)
        for outcome in Reload:
            self.reloads.labels(result=outcome.value)
        self.roots = Gauge("trellis_trust_bundle_roots", "Roots in the trust bundle in force.",
                           registry=registry)
        self.roots.set(len(self.current))

    def check(self) -> TrustBundle | None:
        """The new bundle if the file changed to a different, usable one; else None."""
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            bundle = TrustBundle.of_file(self.path)
        except TrustBundleError as exc:
            self.reloads.labels(result=Reload.INVALID.value).inc()
            log.error("trust bundle not reloaded; keeping the one in force",
                      extra={"fields": {"path": str(self.path), "error": str(exc),
                                        "roots_in_force": len(self.current)}})
            return None
        if bundle.fingerprints == self.current.fingerprints:
            return None  # rewritten, same roots (a kubelet resync)
        self.current = bundle
        self.reloads.labels(result=Reload.APPLIED.value).inc()
        self.roots.set(len(bundle))
        log.info("trust bundle reloaded", extra={"fields": {
            "path": str(self.path), "roots": len(bundle),
            "fingerprints": sorted(f.hex()[:16] for f in bundle.fingerprints)}})
        return bundle

    async def follow(self, on_change: Callable[[TrustBundle], None],
                     interval_s: float = DEFAULT_INTERVAL_S) -> None:
        """Forever: check every ``interval_s``, hand each new bundle to ``on_change``."""
        while True:
            await asyncio.sleep(interval_s)
            bundle = self.check()
            if bundle is None:
                continue
            try:
                on_change(bundle)
            except Exception:  # one failed apply must not end reloading for good
                log.exception("trust bundle change not applied", extra={"fields": {
                    "path": str(self.path)}})


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_BUNDLE_BYTES + 1)
    except OSError as exc:
        raise TrustBundleError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BUNDLE_BYTES:
        raise TrustBundleError(f"{path}: larger than {MAX_BUNDLE_BYTES} bytes")
    return data


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows ..data → the directory the kubelet swapped in
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _is_ca(cert: x509.Certificate) -> bool:
    # Extensions are decoded only here: a duplicate or undecodable one is "not a CA",
    # never an exception that would end the bundle's follower.
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, x509.DuplicateExtension, x509.UnsupportedGeneralNameType,
            ValueError):
        return False
