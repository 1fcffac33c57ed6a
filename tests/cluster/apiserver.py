"""The API-server stand-in as the chart's components meet it in a cluster: over TLS at
the in-cluster address (``KUBERNETES_SERVICE_HOST``), its CA in every pod's
service-account volume, serving only the CRDs the rendered chart installs, and
answering GET of the workloads the chart renders (the agent DaemonSet: 200, a
``deletionTimestamp`` while it is being deleted, then ``NotFound`` naming it).

It runs on an event loop of its own in a thread, so the harness (plain blocking
code driving processes) calls it through ``call``.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.nodeagent.fake_apiserver import (
    CONFIGMAPS,
    CRD_BACKED,
    KINDS,
    FakeApiServer,
    _status,
)

T = TypeVar("T")
WORKLOAD_KINDS = {"DaemonSet": "daemonsets", "Deployment": "deployments"}


def crd_collections(docs: list[dict[str, Any]]) -> frozenset[str]:
    """The policy collections the rendered chart's CRDs define (``--include-crds``)."""
    served = set()
    for doc in docs:
        if doc.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc["spec"]
        for version in spec["versions"]:
            if version.get("served", True):
                served.add(f"/apis/{spec['group']}/{version['name']}/{spec['names']['plural']}")
    unknown = served - set(KINDS)
    assert not unknown, f"the chart defines CRDs the stand-in cannot serve: {sorted(unknown)}"
    assert served <= CRD_BACKED
    return frozenset(served)


def serving_pair(address: str, where: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for ``address`` signed by it (as kube-apiserver's
    serving certificate names the Service's ClusterIP). Returns (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tclu-kubernetes-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(hours=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address(address)),
                x509.DNSName("kubernetes.default.svc")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = where / "ca.crt", where / "apiserver.crt", where / "apiserver.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


class ClusterApiServer(FakeApiServer):
    """``FakeApiServer`` plus TLS and the chart's workloads (GET and DELETE)."""

    def __init__(self, *, crds: frozenset[str], token: str, ssl_context: ssl.SSLContext,
                 workloads: list[dict[str, Any]]) -> None:
        super().__init__(token=token, crds=crds, ssl_context=ssl_context)
        self.workloads = {self._workload_path(w): copy.deepcopy(w) for w in workloads}
        self.workload_gets: list[str] = []

    @staticmethod
    def _workload_path(obj: dict[str, Any]) -> str:
        meta = obj["metadata"]
        return (f"/apis/apps/v1/namespaces/{meta['namespace']}/"
                f"{WORKLOAD_KINDS[obj['kind']]}/{meta['name']}")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/apis/apps/v1/namespaces/{ns}/{kind}/{name}", self._get_workload)

    async def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        found = self._objects[CONFIGMAPS].get(f"{namespace}/{name}")
        return None if found is None else dict(found.get("data", {}))

    async def _get_workload(self, request: web.Request) -> web.Response:
        self.workload_gets.append(request.path)
        if not self._authorized(request):
            return _status(401, "Unauthorized", "Unauthorized")
        found = self.workloads.get(request.path)
        if found is None:
            kind, name = request.match_info["kind"], request.match_info["name"]
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                    "reason": "NotFound", "message": f'{kind}.apps "{name}" not found',
                    "details": {"name": name, "group": "apps", "kind": kind}}
            return web.json_response(body, status=404)
        return web.json_response(found)

    def begin_delete(self, kind: str, namespace: str, name: str) -> None:
        """``kubectl delete`` with a finalizer pending: the object is still there,
        carrying a deletionTimestamp."""
        path = f"/apis/apps/v1/namespaces/{namespace}/{WORKLOAD_KINDS[kind]}/{name}"
        self.workloads[path]["metadata"]["deletionTimestamp"] = "2026-12-08T00:00:00Z"

    def remove(self, kind: str, namespace: str, name: str) -> None:
        del self.workloads[f"/apis/apps/v1/namespaces/{namespace}/{WORKLOAD_KINDS[kind]}/{name}"]


class ApiThread:
    """Runs a ``ClusterApiServer`` on its own loop in a thread."""

    def __init__(self, server: ClusterApiServer, sock: socket.socket) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tclu-apiserver",
                                        daemon=True)
        self._thread.start()
        self.call(server.start(sock))

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout)

    def close(self) -> None:
        try:
            self.call(self.server.stop())
            self.call(_cancel_the_rest())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


async def _cancel_the_rest() -> None:
    """Watch handlers still parked on the loop end now, not when it is collected."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context
