"""Root rotation without a proxy restart: the trust bundle file, laid out and
updated as the kubelet updates a ConfigMap volume (a new hidden directory, then
an atomic swap of the ``..data`` symlink), is reloaded into the TLS contexts a
listener already holds. Then a peer with a certificate from the new root is
accepted, and once the old root leaves the bundle its peers are refused, while
a connection made before either change carries on."""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from identity.ca import CertificateAuthority
from identity.certs import CertBundle
from identity.spiffe import Identity
from identity.trust_bundle import BundleFile, TrustBundle, TrustBundleError
from tunnel import tls
from tunnel.identities import TlsIdentities

pytestmark = pytest.mark.inprocess

BACKEND = Identity.of("demo", "backend")
FRONTEND = Identity.of("demo", "frontend")
_serial = itertools.count()


def kubelet_volume(where: Path, content: bytes) -> Path:
    """A ConfigMap volume as the kubelet writes it; returns the file's path."""
    where.mkdir(exist_ok=True)
    data = where / f"..2026_01_01_00_00_{next(_serial):02d}"
    data.mkdir()
    (data / "root-cert.pem").write_bytes(content)
    tmp = where / "..data_tmp"
    tmp.symlink_to(data.name)
    old = (where / "..data").resolve() if (where / "..data").exists() else None
    tmp.rename(where / "..data")  # atomic: readers see the old or the new, never neither
    if old is not None:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    link = where / "root-cert.pem"
    if not link.is_symlink():
        link.symlink_to(Path("..data") / "root-cert.pem")
    return link


class Issued:
    def __init__(self, bundle: CertBundle) -> None:
        self.bundle = bundle

    async def get(self, identity: Identity, timeout: float) -> CertBundle:
        return self.bundle


class Peer:
    """One side of a live TLS connection, in a thread (blocking sockets)."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
        a, b = socket.socketpair()
        self.error: BaseException | None = None
        self.server: ssl.SSLSocket | None = None
        done = threading.Event()

        def serve() -> None:
            try:
                self.server = server_ctx.wrap_socket(a, server_side=True)
                tls.peer_identity(self.server, "cluster.local")
            except (ssl.SSLError, OSError, ValueError) as exc:
                self.error = exc
            done.set()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            self.client = client_ctx.wrap_socket(b)
        except (ssl.SSLError, OSError):
            b.close()
            self.client = None
        thread.join(10)
        assert done.is_set()
        if not self.accepted:
            self.close()
        a.close()  # wrap_socket made its own socket object of this fd, or failed

    @property
    def accepted(self) -> bool:
        return self.error is None and self.client is not None

    def still_carries_bytes(self) -> bool:
        assert self.client is not None and self.server is not None
        self.client.sendall(b"ping")
        return self.server.recv(4) == b"ping"

    def close(self) -> None:
        for s in (self.client, self.server):
            if s is not None:
                s.close()
        self.client = self.server = None

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_a_new_root_is_trusted_and_an_old_one_dropped_without_a_restart(
        tmp_path: Path) -> None:
    old, new = CertificateAuthority.create(), CertificateAuthority.create()
    volume = tmp_path / "ca-root"
    path = kubelet_volume(volume, old.root_pem)
    bundle_file = BundleFile(path, registry=CollectorRegistry())
    identities = TlsIdentities(Issued(old.issue(BACKEND)), trust=bundle_file.current)

    def client(ca: CertificateAuthority) -> ssl.SSLContext:
        # Another node's proxy, which already trusts both roots.
        issued = ca.issue(FRONTEND)
        both = TrustBundle.parse(old.root_pem + new.root_pem, "test")
        return tls.client_context(issued, both)

    async def main() -> None:
        listener = await identities.server_context(BACKEND)  # held for the listener's life
        before = Peer(listener, client(old))
        assert before.accepted
        refused = Peer(listener, client(new))
        assert not refused.accepted  # control: the new root is not trusted yet
        assert bundle_file.check() is None  # nothing changed yet

        # 1. The CA publishes old + new; the kubelet swaps the volume.
        kubelet_volume(volume, old.root_pem + new.root_pem)
        changed = bundle_file.check()
        assert changed is not None and len(changed) == 2
        identities.on_trust_changed(changed)
        assert (await identities.server_context(BACKEND)) is listener
        with Peer(listener, client(new)) as accepted:
            assert accepted.accepted
        assert before.still_carries_bytes()

        # 2. Signing switched; 3. the old root leaves the bundle.
        kubelet_volume(volume, new.root_pem)
        changed = bundle_file.check()
        assert changed is not None and len(changed) == 1
        identities.on_trust_changed(changed)
        late = Peer(listener, client(old))
        assert isinstance(late.error, tls.UntrustedRoot)
        with Peer(listener, client(new)) as accepted:
            assert accepted.accepted
        assert before.still_carries_bytes()  # the old connection was never dropped
        before.close()

    asyncio.run(main())
    assert bundle_file.reloads.labels(result="applied")._value.get() == 2


def test_an_unusable_bundle_keeps_the_one_in_force(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    volume = tmp_path / "ca-root"
    path = kubelet_volume(volume, ca.root_pem)
    bundle_file = BundleFile(path, registry=CollectorRegistry())
    for content in (b"", b"not pem", ca.issue(BACKEND).chain_pem):
        kubelet_volume(volume, content)
        assert bundle_file.check() is None
        assert bundle_file.current.pem == ca.root_pem
    assert bundle_file.reloads.labels(result="invalid")._value.get() == 3
    kubelet_volume(volume, ca.root_pem)  # the same roots again: nothing to apply
    assert bundle_file.check() is None
    with pytest.raises(TrustBundleError, match=r"root-cert\.pem: no PEM certificate"):
        TrustBundle.of_file(kubelet_volume(volume, b"garbage"))


def test_follow_hands_over_a_swapped_bundle(tmp_path: Path) -> None:
    old, new = CertificateAuthority.create(), CertificateAuthority.create()
    volume = tmp_path / "ca-root"
    bundle_file = BundleFile(kubelet_volume(volume, old.root_pem),
                             registry=CollectorRegistry())

    async def main() -> TrustBundle:
        got: asyncio.Queue[TrustBundle] = asyncio.Queue()
        follower = asyncio.ensure_future(bundle_file.follow(got.put_nowait, interval_s=0.01))
        try:
            kubelet_volume(volume, old.root_pem + new.root_pem)
            return await asyncio.wait_for(got.get(), 10)
        finally:
            follower.cancel()

    assert len(asyncio.run(main())) == 2


def test_a_failed_apply_does_not_end_the_following(tmp_path: Path) -> None:
    first, second, third = (CertificateAuthority.create() for _ in range(3))
    volume = tmp_path / "ca-root"
    bundle_file = BundleFile(kubelet_volume(volume, first.root_pem),
                             registry=CollectorRegistry())

    async def main() -> int:
        got: asyncio.Queue[TrustBundle] = asyncio.Queue()
        calls = 0

        def apply(bundle: TrustBundle) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("the first apply fails")
            got.put_nowait(bundle)

        follower = asyncio.ensure_future(bundle_file.follow(apply, interval_s=0.01))
        try:
            kubelet_volume(volume, first.root_pem + second.root_pem)
            while calls == 0:
                await asyncio.sleep(0.01)
            kubelet_volume(volume, first.root_pem + third.root_pem)
            return len(await asyncio.wait_for(got.get(), 10))
        finally:
            follower.cancel()

    assert asyncio.run(main()) == 2
