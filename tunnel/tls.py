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
* Trust: the roots come from the proxy's trust bundle file
  (``identity.trust_bundle``) when it has one, else from the CA's answer. A
  changed bundle is loaded into the live contexts (``update_trust``). OpenSSL
  can add roots to a context's store but never remove one, so each context also
  remembers the bundle's fingerprints, and `peer_identity` refuses a chain that
  verified only through a root no longer in it: established connections stay,
  new handshakes follow the bundle.
* Keys never touch disk: ``load_cert_chain`` only takes a path, so the PEM is
  written to an anonymous memory file (``memfd_create``) and loaded through
  ``/proc/self/fd/N`` (``identity.tls_pem``); the descriptor is closed right after.
"""

from __future__ import annotations

import ssl

from identity.certs import CertBundle, PeerIdentityError, identity_of_peer
from identity.spiffe import Identity
from identity.tls_pem import load_cert_chain_pem
from identity.trust_bundle import TrustBundle, fingerprint

ALPN = "h2"


class WrongTrustDomain(PeerIdentityError):
    """The peer's certificate names an identity outside the trust domain we accept."""


class UntrustedRoot(PeerIdentityError):
    """The peer's chain verified only through a root no longer in the trust bundle."""


class MeshContext(ssl.SSLContext):
    """An SSLContext that knows which roots it may still verify through (None: all
    in its store; a context built without a trust bundle)."""

    trusted: frozenset[bytes] | None = None


def server_context(bundle: CertBundle, trust: TrustBundle | None = None) -> ssl.SSLContext:
    """For the inbound 15008 listener: our workload certificate, client certificate required."""
    ctx = MeshContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, bundle, trust)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = 0
    return ctx


def client_context(bundle: CertBundle, trust: TrustBundle | None = None) -> ssl.SSLContext:
    """For outbound tunnels: present `bundle`'s certificate, verify the server's chain."""
    ctx = MeshContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the URI SAN is checked by peer_identity, not a hostname
    _common(ctx, bundle, trust)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, trust_domain: str) -> Identity:
    """The verified peer's SPIFFE identity; raises PeerIdentityError (a ValueError) if none
    or `WrongTrustDomain` if it belongs to another trust domain."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("peer presented no certificate")
    _check_anchor(ssl_object)
    identity = identity_of_peer(der)
    if identity.trust_domain != trust_domain:
        raise WrongTrustDomain(
            f"peer identity {identity} is outside trust domain {trust_domain!r}")
    return identity


def update_trust(ctx: ssl.SSLContext, trust: TrustBundle) -> None:
    """A live context follows a new trust bundle: its roots are added to the store,
    and only they may anchor a chain from now on."""
    ctx.load_verify_locations(cadata=trust.pem.decode("ascii"))
    if isinstance(ctx, MeshContext):
        ctx.trusted = trust.fingerprints


def _check_anchor(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> None:
    context = ssl_object.context
    if not isinstance(context, MeshContext) or context.trusted is None:
        return
    chain = _verified_chain(ssl_object)
    if not chain or fingerprint(chain[-1]) not in context.trusted:
        raise UntrustedRoot("peer's certificate chain ends at a root that is no longer "
                            "in the trust bundle")


def _verified_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The chain OpenSSL verified, leaf first and the trust anchor last, as DER.
    Python 3.13 made this public; 3.10 to 3.12 have it only on the private
    ``_sslobj`` (returning certificate objects), and nothing else tells which root
    a peer verified through."""
    public = getattr(ssl_object, "get_verified_chain", None)
    if public is not None:
        return list(public())
    certs = ssl_object._sslobj.get_verified_chain()  # type: ignore[union-attr]
    return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
            for c in certs or ()]


def _common(ctx: MeshContext, bundle: CertBundle, trust: TrustBundle | None) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    ctx.load_verify_locations(cadata=(trust.pem if trust else bundle.root_pem).decode("ascii"))
    ctx.trusted = trust.fingerprints if trust else None
    load_cert_chain_pem(ctx, bundle.chain_pem, bundle.key_pem)
