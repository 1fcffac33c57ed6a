"""One pod served by the real `Proxy` in this process, and an unenrolled client (root).

    ns "pod"     198.18.220.10  enrolled: the agent's iptables capture and the
                                proxy's 15001/15006/15008 listeners; an echo app
                                on 8080 and a sink on 8081 that never reads
    ns "client"  198.18.220.20  not in the mesh, with an echo app on 8080 of its own;
                                also dials HBONE with frontend's certificate, as a
                                peer node's proxy would

The two are joined by one veth pair. The proxy is the node agent's own `Proxy`,
so what a test measures here (fds, tasks, live connections) is the proxy's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from conftest import BACKEND, FRONTEND
from hbone_env import run

from identity.certs import CertBundle
from identity.spiffe import Identity
from nodeagent.iptables import IptablesRedirector
from nodeagent.redirect import PodNetwork
from tunnel import tls
from tunnel.balancer import RoundRobin
from tunnel.config import INBOUND_HBONE_PORT, ProxyConfig
from tunnel.context import ProxyInputs, StateView
from tunnel.hbone_io import HboneConnection
from tunnel.identities import TlsIdentities
from tunnel.metrics import ProxyMetrics
from tunnel.netns import NetnsHandle, listen_in, socket_in
from tunnel.pool import HboneConnectionPool
from tunnel.proxy import Proxy
from tunnel.state import MeshState, Workload

POD_IP = "198.18.220.10"
CLIENT_IP = "198.18.220.20"
ECHO_PORT = 8080
SINK_PORT = 8081


@dataclass(frozen=True, slots=True)
class Bed:
    pod_ns: str
    client_ns: str

    @property
    def pod_path(self) -> str:
        return f"/run/netns/{self.pod_ns}"

    @property
    def client_path(self) -> str:
        return f"/run/netns/{self.client_ns}"

    def workload(self) -> Workload:
        return Workload(uid="uid-backend", name="backend", namespace=BACKEND.namespace,
                        node="node-1", ip=POD_IP, service_account=BACKEND.service_account,
                        labels={"app": "backend"}, enrolled=True, netns=self.pod_path)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def pod_bed() -> Iterator[Bed]:
    tag = uuid.uuid4().hex[:6]
    bed = Bed(f"trl-t-{tag}-pod", f"trl-t-{tag}-cli")
    try:
        for ns in (bed.pod_ns, bed.client_ns):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", bed.pod_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", bed.client_ns)
        for ns, address in ((bed.pod_ns, POD_IP), (bed.client_ns, CLIENT_IP)):
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        IptablesRedirector().apply(PodNetwork.of(bed.workload()))
        yield bed
    finally:
        for ns in (bed.pod_ns, bed.client_ns):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def run_in_bed(main: Callable[[Bed], Coroutine[Any, Any, None]]) -> None:
    """A fresh bed, then ``main(bed)`` on a uvloop loop. The bed is made outside the
    loop: the agent's redirector drives pyroute2, which runs a loop of its own."""
    with pod_bed() as bed:
        run(lambda: main(bed))


class _StaticCerts:
    def __init__(self, bundles: Mapping[Identity, CertBundle]) -> None:
        self._bundles = bundles

    async def get(self, identity: Identity, timeout: float) -> CertBundle:
        return self._bundles[identity]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


class ServedPod:
    """The proxy serving the bed's pod, and the pod's two apps."""

    def __init__(self, bed: Bed, backend_bundle: CertBundle, **config: object) -> None:
        self.bed = bed
        self.inputs = ProxyInputs(
            config=ProxyConfig(node="node-1", connect_timeout_s=3.0, **config),  # type: ignore[arg-type]
            state=StateView(MeshState(workloads=(bed.workload(),))),
            tls=TlsIdentities(_StaticCerts({BACKEND: backend_bundle})),
            pool=HboneConnectionPool(), metrics=ProxyMetrics(), balancer=RoundRobin())
        self.proxy = Proxy(self.inputs)
        self._servers: list[asyncio.Server] = []
        self.sink_peers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> ServedPod:
        with NetnsHandle(self.bed.pod_path) as handle:
            echo = listen_in(handle, ECHO_PORT, host=POD_IP, mark=None)
            sink = listen_in(handle, SINK_PORT, host=POD_IP, mark=None)
        with NetnsHandle(self.bed.client_path) as handle:
            outside = listen_in(handle, ECHO_PORT, host=CLIENT_IP, mark=None)
        self._servers.append(await asyncio.start_server(_echo, sock=echo))
        self._servers.append(await asyncio.start_server(self._sink, sock=sink))
        self._servers.append(await asyncio.start_server(_echo, sock=outside))
        await self.proxy.add_pod(self.bed.workload(), self.bed.pod_path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.proxy.close()
        for writer in self.sink_peers:
            writer.close()
        for server in self._servers:
            server.close()
            await server.wait_closed()

    async def _sink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sink_peers.append(writer)  # held open, never read

    @property
    def pod(self):  # type: ignore[no-untyped-def]
        return self.proxy.pods["uid-backend"]

    def live(self) -> int:
        return len(self.pod.connections)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels` (0 if none)."""
        return sum(sample.value for family in self.inputs.metrics.registry.collect()
                   for sample in family.samples
                   if sample.name == name and labels.items() <= sample.labels.items())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait, bounded, for a condition the loop makes true on a later pass (a socket the
    proxy aborted is closed by the loop after the call returns)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


async def connect(netns_path: str, address: tuple[str, int], timeout: float = 3.0
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection from inside a namespace (no mark: an app's own socket)."""
    with NetnsHandle(netns_path) as handle:
        sock = socket_in(handle, socket.AF_INET, socket.SOCK_STREAM)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def refused(netns_path: str, address: tuple[str, int], timeout: float = 3.0) -> bool:
    """Connect, send a line, and wait for the end: True when the proxy reset or closed
    it without an answer. A relay (to itself or anywhere) never ends on its own, so
    the wait ends in a TimeoutError instead."""
    reader, writer = await connect(netns_path, address, timeout)
    try:
        writer.write(b"hello\n")
        async with asyncio.timeout(timeout):
            try:
                return await reader.read(1) == b""
            except ConnectionResetError:
                return True
    finally:
        writer.close()


async def echoes(netns_path: str, address: tuple[str, int]) -> bool:
    """The positive control: a line sent through the proxy comes back from the app."""
    reader, writer = await connect(netns_path, address)
    try:
        writer.write(b"ping\n")
        async with asyncio.timeout(3.0):
            return await reader.readline() == b"ping\n"
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def hbone_peer(bed: Bed, frontend_bundle: CertBundle) -> AsyncIterator[HboneConnection]:
    """An HBONE connection to the pod's 15008 from the client namespace, as frontend."""
    with NetnsHandle(bed.client_path) as handle:
        sock = socket_in(handle, socket.AF_INET, socket.SOCK_STREAM)
    conn = await HboneConnection.connect(
        sock, (POD_IP, INBOUND_HBONE_PORT), tls.client_context(frontend_bundle), BACKEND,
        trust_domain=FRONTEND.trust_domain, connect_timeout=3.0)
    try:
        yield conn
    finally:
        conn.abort()
        await conn.wait_closed()
