"""A two-pod bed for HBONE interop with Envoy: a Trellis-served pod and an Envoy pod.

    ns "app"    198.18.210.10  enrolled; the Trellis proxy (in this test process)
                               binds 15001/15006/15008 inside it, iptables redirect on
    ns "envoy"  198.18.210.20  Envoy (a real process) as HBONE client and server;
                198.18.210.21  extra addresses, one per Envoy server listener that
                198.18.210.22  must fail (wrong identity, expired certificate)

The namespaces are joined by one veth pair, as two pods on one bridge would be.
The proxy runs in-process (the same `Proxy` the node agent runs), so a test
builds its own `MeshState` and `PolicyIndex`: Envoy's addresses are registered
as *enrolled* workloads on another node, which is what makes Trellis speak
HBONE to them.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import socket
import struct
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from identity.ca import CertificateAuthority
from identity.certs import CertBundle
from identity.spiffe import Identity
from nodeagent.iptables import IptablesRedirector
from nodeagent.redirect import PodNetwork
from policy import PolicyIndex, load_yaml
from tunnel.balancer import RoundRobin
from tunnel.config import ProxyConfig
from tunnel.context import ProxyInputs, StateView
from tunnel.identities import TlsIdentities
from tunnel.metrics import ProxyMetrics
from tunnel.netns import NetnsHandle, listen_in, socket_in
from tunnel.pool import HboneConnectionPool
from tunnel.proxy import Proxy
from tunnel.state import MeshState, Workload

T = TypeVar("T")

APP_IP = "198.18.210.10"
ENVOY_IP = "198.18.210.20"
ENVOY_IMPOSTOR_IP = "198.18.210.21"
ENVOY_EXPIRED_IP = "198.18.210.22"
SPOOFED_IP = "198.18.210.99"  # nobody has it; only ever written in a forwarded header
APP_PORT = 8080

BACKEND = Identity.of("demo", "backend")
ENVOY_CLIENT = Identity.of("demo", "envoy-client")
WAYPOINT = Identity.of("demo", "waypoint")


@dataclass(frozen=True, slots=True)
class Bed:
    app_ns: str
    envoy_ns: str
    dir: Path

    def netns_path(self, name: str) -> str:
        return f"/run/netns/{name}"


def make_bed(directory: Path) -> Bed:
    tag = uuid.uuid4().hex[:6]
    bed = Bed(f"trl-t-{tag}-app", f"trl-t-{tag}-env", directory)
    for ns in (bed.app_ns, bed.envoy_ns):
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", bed.app_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
        "netns", bed.envoy_ns)
    for ns, addresses in ((bed.app_ns, [APP_IP]),
                          (bed.envoy_ns, [ENVOY_IP, ENVOY_IMPOSTOR_IP, ENVOY_EXPIRED_IP])):
        for address in addresses:
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
    return bed


# Fixtures, imported by name into each test module; the CA, `ca`, is the root
# tests/conftest.py's. (No conftest.py here: the tunnel tests import their own
# `conftest` module by name, and a second one on sys.path would shadow it.)


@pytest.fixture(scope="module", name="bed")
def bed_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """The two namespaces, the app pod's redirection; removed after the module."""
    made = make_bed(tmp_path_factory.mktemp("interop"))
    try:
        redirect_app_pod(made)
        yield made
    finally:
        remove_bed(made)


def remove_bed(bed: Bed) -> None:
    for ns in (bed.app_ns, bed.envoy_ns):
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def workload(name: str, ip: str, identity: Identity, *, node: str, netns: str = "") -> Workload:
    return Workload(uid=f"uid-{name}", name=name, namespace=identity.namespace, node=node,
                    ip=ip, service_account=identity.service_account, labels={"app": name},
                    enrolled=True, netns=netns)


def app_workload(bed: Bed) -> Workload:
    return workload("backend", APP_IP, BACKEND, node="node-1",
                    netns=bed.netns_path(bed.app_ns))


def redirect_app_pod(bed: Bed) -> None:
    """The enrolled pod's iptables capture and return-path route (removed with the ns)."""
    IptablesRedirector().apply(PodNetwork.of(app_workload(bed)))


def expired(ca: CertificateAuthority, identity: Identity) -> CertBundle:
    """A certificate for `identity` that was valid for one hour, two days ago."""
    return ca.issue(identity, lifetime=timedelta(hours=1),
                    not_before=datetime.now(UTC) - timedelta(days=2))


def policies(yaml_text: str) -> PolicyIndex:
    result = load_yaml(yaml_text)
    assert not result.errors, result.errors
    return PolicyIndex.build(result.policies)


class _StaticCerts:
    def __init__(self, bundles: Mapping[Identity, CertBundle]) -> None:
        self._bundles = bundles

    async def get(self, identity: Identity, timeout: float) -> CertBundle:
        return self._bundles[identity]


class TrellisNode:
    """The node proxy serving the app pod, in this process's event loop."""

    def __init__(self, bed: Bed, state: MeshState, bundles: Mapping[Identity, CertBundle],
                 policy_index: PolicyIndex | None = None) -> None:
        self.bed = bed
        self.inputs = ProxyInputs(
            config=ProxyConfig(node="node-1", connect_timeout_s=3.0), state=StateView(
                state, policy_index), tls=TlsIdentities(_StaticCerts(bundles)),
            pool=HboneConnectionPool(), metrics=ProxyMetrics(), balancer=RoundRobin())
        self.proxy = Proxy(self.inputs)

    async def __aenter__(self) -> TrellisNode:
        await self.proxy.add_pod(app_workload(self.bed), self.bed.netns_path(self.bed.app_ns))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.proxy.close()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels`."""
        return sum(sample.value for family in self.inputs.metrics.registry.collect()
                   for sample in family.samples
                   if sample.name == name and labels.items() <= sample.labels.items())


# The app: "<download bytes>\n", then the upload until EOF (the client's
# half-close); answers one JSON line {"peer", "bytes", "sha256"} and the download.
# A first line "rst" instead makes it read what comes, then reset (RST) the
# connection. Every connection's end ("eof" or "reset") goes into App.ends.

RESET_REQUEST = b"rst\n"


async def _report(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  ends: asyncio.Queue[str]) -> None:
    end = "eof"
    try:
        peer = writer.get_extra_info("peername")
        first = await reader.readline()
        if first == RESET_REQUEST:
            await reader.read(1)
            reset(writer)
            return
        download = int(first)
        digest, total = hashlib.sha256(), 0
        while chunk := await reader.read(256 * 1024):
            digest.update(chunk)
            total += len(chunk)
        writer.write(json.dumps({"peer": peer[0], "bytes": total,
                                 "sha256": digest.hexdigest()}).encode() + b"\n")
        writer.write(pattern(download))
        await writer.drain()
    except ConnectionResetError:
        end = "reset"
    except (OSError, ValueError) as exc:
        end = f"error: {exc!r}"
    finally:
        ends.put_nowait(end)
        writer.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def pattern(n: int) -> bytes:
    block = bytes(range(251))  # a prime length, so a shifted or dropped chunk shows
    return (block * (n // len(block) + 1))[:n]


class App:
    """The report app listening on (ip, port) inside `netns`."""

    def __init__(self, netns: str, address: tuple[str, int]) -> None:
        self.netns = netns
        self.address = address
        self.ends: asyncio.Queue[str] = asyncio.Queue()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> App:
        with NetnsHandle(f"/run/netns/{self.netns}") as handle:
            sock = listen_in(handle, self.address[1], host=self.address[0], mark=None)
        self._server = await asyncio.start_server(
            lambda r, w: _report(r, w, self.ends), sock=sock)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def send_then_reset(netns: str, address: tuple[str, int], data: bytes,
                          timeout: float = 5.0) -> None:
    """Connect from inside `netns`, send `data`, wait a moment, then reset (RST)."""
    with NetnsHandle(f"/run/netns/{netns}") as handle:
        sock = socket_in(handle, socket.AF_INET, socket.SOCK_STREAM)
    async with asyncio.timeout(timeout):
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        _, writer = await asyncio.open_connection(sock=sock)
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(0.2)  # let the bytes cross the tunnel before the reset
        reset(writer)


@dataclass(frozen=True, slots=True)
class Exchange:
    report: dict[str, Any] | None  # None: the connection closed before the app answered
    download: bytes
    reset: bool = False  # the connection ended with a RST rather than a FIN


async def exchange(netns: str, address: tuple[str, int], upload: bytes, download: int,
                   timeout: float = 10.0) -> Exchange:
    """Connect from inside `netns`, send "<download>\\n" and the upload, half-close,
    read to EOF. A negative `download` sends `upload` alone (e.g. RESET_REQUEST)."""
    with NetnsHandle(f"/run/netns/{netns}") as handle:
        sock = socket_in(handle, socket.AF_INET, socket.SOCK_STREAM)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        try:
            await loop.sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        reset_seen = False
        try:
            writer.write(upload if download < 0 else f"{download}\n".encode() + upload)
            writer.write_eof()
            await writer.drain()
            received = await reader.read(-1)
        except ConnectionResetError:
            received, reset_seen = b"", True
        except OSError:  # e.g. ENOTCONN from write_eof: the peer already closed
            received = b""
        finally:
            writer.close()
    line, sep, rest = received.partition(b"\n")
    if not sep:
        return Exchange(None, b"", reset_seen)
    return Exchange(json.loads(line), rest, reset_seen)


def run(main: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run `main` on a fresh uvloop loop, as the agent does.

    Resource warnings are swallowed, not asserted: with pytest's
    ``filterwarnings = error`` a ResourceWarning raised inside uvloop's
    ``loop.close()`` hangs it instead of failing the test. Envoy keeps pooled
    connections open past the end of a test, so sockets can still be open at
    loop close. (`Proxy.remove_pod` does abort tunnels peers opened to the pod.)
    """
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            return runner.run(asyncio.wait_for(main, timeout))
        finally:
            runner.close()
            gc.collect()


def envoy_log(path: Path) -> list[dict[str, Any]]:
    """Envoy's JSON access-log lines so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def wait_for_log(path: Path, match: Callable[[dict[str, Any]], bool],
                 timeout: float = 5.0) -> dict[str, Any]:
    """The first access-log entry that `match`es. Envoy flushes its file log about
    once a second, so poll (bounded) instead of reading once."""
    deadline = time.monotonic() + timeout
    while True:
        entries = envoy_log(path)
        for entry in entries:
            if match(entry):
                return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching entry in {path}: {entries}")
        time.sleep(0.05)
