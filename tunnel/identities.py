"""TLS contexts per workload identity, kept current as certificates rotate.

A listener holds on to its ``SSLContext`` for its whole life, so a renewed
certificate is loaded *into* the existing contexts instead of replacing them;
new handshakes pick it up, established connections keep theirs. A new trust
bundle (``identity.trust_bundle``) reaches them the same way (`on_trust_changed`).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Protocol

from identity.certs import CertBundle
from identity.spiffe import Identity
from identity.tls_pem import load_cert_chain_pem
from identity.trust_bundle import TrustBundle
from tunnel import tls


class CertificateProvider(Protocol):
    async def get(self, identity: Identity, timeout: float) -> CertBundle: ...


class TlsIdentities:
    def __init__(self, provider: CertificateProvider, *, fetch_timeout: float = 10.0,
                 trust: TrustBundle | None = None) -> None:
        self._provider = provider
        self._timeout = fetch_timeout
        self._trust = trust  # None: trust the roots each CA answer names
        self._client: dict[Identity, tuple[CertBundle, ssl.SSLContext]] = {}
        self._server: dict[Identity, tuple[CertBundle, ssl.SSLContext]] = {}

    async def client_context(self, identity: Identity) -> ssl.SSLContext:
        return await self._context(identity, self._client, tls.client_context)

    async def server_context(self, identity: Identity) -> ssl.SSLContext:
        return await self._context(identity, self._server, tls.server_context)

    def on_renewed(self, bundle: CertBundle) -> None:
        """Load a renewed certificate into the contexts already handed out."""
        for cache in (self._client, self._server):
            entry = cache.get(bundle.identity)
            if entry is not None and entry[0] is not bundle:
                load_cert_chain_pem(entry[1], bundle.chain_pem, bundle.key_pem)
                cache[bundle.identity] = (bundle, entry[1])

    def on_trust_changed(self, trust: TrustBundle) -> None:
        """Trust ``trust`` from now on, in every context already handed out too."""
        self._trust = trust
        for cache in (self._client, self._server):
            for _bundle, context in cache.values():
                tls.update_trust(context, trust)

    def forget(self, identity: Identity) -> None:
        self._client.pop(identity, None)
        self._server.pop(identity, None)

    async def _context(self, identity: Identity,
                       cache: dict[Identity, tuple[CertBundle, ssl.SSLContext]],
                       build: Callable[[CertBundle, TrustBundle | None], ssl.SSLContext],
                       ) -> ssl.SSLContext:
        entry = cache.get(identity)
        if entry is not None:
            return entry[1]
        bundle = await self._provider.get(identity, self._timeout)
        entry = cache.get(identity)  # another caller may have built it meanwhile
        if entry is None:
            entry = (bundle, build(bundle, self._trust))
            cache[identity] = entry
        return entry[1]
