"""TLS contexts for HBONE: mutual TLS 1.3, ALPN h2, SPIFFE identities checked by us.

What we control and what we cannot
-----------------------------------
* Version: TLS 1.3 only (minimum = maximum = 1.3).
* ALPN: ``h2`` only; the adapters refuse a connection that negotiated anything else.
* Chain: verified by OpenSSL against the bundle's root(s). The *identity* is
  not a hostname, so ``check_hostname`` is off and `peer_identity` reads the
  one SPIFFE URI SAN instead (the client compares it with the identity it
  expected, the server with its trust domain).
* Cipher suites: Python's ``ssl`` has no API for the TLS 1.3 suite list
  (``set_ciphers`` only governs TLS ≤ 1.2, which we disable). OpenSSL 3's
  default list is AES-256-GCM, ChaCha20-Poly1305, AES-128-GCM. Servers set
  ``OP_CIPHER_SERVER_PREFERENCE`` so that order wins and two Trellis peers, or
  ztunnel (which offers only AES-GCM), always agree on AES-GCM. Restricting the
  list further needs an OpenSSL config file (``Ciphersuites =``) for the
  process, which is deployment policy, not this module's business.
* Session tickets: the server issues none. Every connection proves its
  certificate afresh, and pooled connections make resumption pointless.
* Keys never touch disk: ``load_cert_chain`` only takes a path, so the PEM is
  written to an anonymous memory file (``memfd_create``) and loaded through
  ``/proc/self/fd/N``; the descriptor is closed right after.
"""

from __future__ import annotations

import os
import ssl

from identity.certs import CertBundle, PeerIdentityError, identity_of_peer
from identity.spiffe import Identity

ALPN = "h2"


class WrongTrustDomain(PeerIdentityError):
    """The peer's certificate names an identity outside the trust domain we accept."""


def server_context(bundle: CertBundle) -> ssl.SSLContext:
    """For the inbound 15008 listener: our workload certificate, client certificate required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, bundle)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = 0
    return ctx


def client_context(bundle: CertBundle) -> ssl.SSLContext:
    """For outbound tunnels: present `bundle`'s certificate, verify the server's chain."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the URI SAN is checked by peer_identity, not a hostname
    _common(ctx, bundle)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, trust_domain: str) -> Identity:
    """The verified peer's SPIFFE identity; raises PeerIdentityError (a ValueError) if none
    or `WrongTrustDomain` if it belongs to another trust domain."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("peer presented no certificate")
    identity = identity_of_peer(der)
    if identity.trust_domain != trust_domain:
        raise WrongTrustDomain(
            f"peer identity {identity} is outside trust domain {trust_domain!r}")
    return identity


def _common(ctx: ssl.SSLContext, bundle: CertBundle) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    ctx.load_verify_locations(cadata=bundle.root_pem.decode("ascii"))
    _load_chain_in_memory(ctx, bundle.chain_pem, bundle.key_pem)


def _load_chain_in_memory(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    fd = os.memfd_create("trellis-credentials", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem + b"\n" + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
