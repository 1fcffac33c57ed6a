"""Kubelet probes in real namespaces (root): the node SNATs its own TCP to an enrolled
pod to 169.254.7.127, the pod lets exactly that through to the app, and traffic the
node only forwards is still captured.

Topology: ``node`` (plays the host: the test's sockets there are kubelet's) —
veth — ``pod`` (iptables redirection, the proxy's listeners made by the test);
``client`` — veth — ``node``, whose connections the node routes to the pod.
"""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from nodeagent.host_probe import CHAIN, HostProbeRules
from nodeagent.iptables import IptablesRedirector
from nodeagent.redirect import PodNetwork
from tunnel.netns import NetnsHandle, listen_in, original_dst, socket_in

pytestmark = pytest.mark.netns

POD_IP, NODE_IP = "198.18.210.2", "198.18.210.1"
CLIENT_IP, NODE_CLIENT_SIDE = "198.18.211.2", "198.18.211.1"
PROBE = "169.254.7.127"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def _nat(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "iptables-save", "-t", "nat"],
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture
def client_netns() -> Iterator[str]:
    name = f"trl-c-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def topology(netns: str, peer_netns: str, client_netns: str,
             connect_veth) -> tuple[PodNetwork, str, str]:  # type: ignore[no-untyped-def]
    pod_ns, node_ns = netns, peer_netns
    connect_veth(pod_ns, f"{POD_IP}/24", node_ns, f"{NODE_IP}/24")
    _ip("-n", pod_ns, "route", "add", "default", "via", NODE_IP)
    _ip("-n", client_netns, "link", "add", "eth0", "type", "veth", "peer", "name", "cl0",
        "netns", node_ns)
    _ip("-n", client_netns, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
    _ip("-n", client_netns, "link", "set", "eth0", "up")
    _ip("-n", client_netns, "route", "add", "default", "via", NODE_CLIENT_SIDE)
    _ip("-n", node_ns, "addr", "add", f"{NODE_CLIENT_SIDE}/24", "dev", "cl0")
    _ip("-n", node_ns, "link", "set", "cl0", "up")
    subprocess.run(["ip", "netns", "exec", node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                   check=True)
    pod = PodNetwork(uid="uid-probe", key="demo/app-1", netns_path=f"/run/netns/{pod_ns}",
                     ip=POD_IP)
    return pod, node_ns, client_netns


def _connect_from(ns: NetnsHandle, port: int) -> socket.socket:
    sock = socket_in(ns)
    sock.setblocking(True)
    sock.settimeout(3)
    try:
        sock.connect((POD_IP, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _accept(listener: socket.socket) -> socket.socket:
    listener.settimeout(3)
    return listener.accept()[0]


def _nothing_pending(listener: socket.socket) -> bool:
    listener.setblocking(False)
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return True
    return False


def test_a_host_probe_reaches_the_app_as_the_probe_source_and_forwarded_traffic_is_captured(
        topology: tuple[PodNetwork, str, str]) -> None:
    pod, node_ns, client_ns = topology
    IptablesRedirector().apply(pod)
    host = HostProbeRules(f"/run/netns/{node_ns}")
    with NetnsHandle(pod.netns_path) as ns, NetnsHandle(f"/run/netns/{node_ns}") as node, \
            NetnsHandle(f"/run/netns/{client_ns}") as client, \
            listen_in(ns, 15006) as inbound, listen_in(ns, 15001) as outbound, \
            listen_in(ns, 8080, mark=None) as app:
        # Control: without the host rule, the node's connection is captured like any other.
        with _connect_from(node, 8080), _accept(inbound) as captured:
            assert captured.getpeername()[0] == NODE_IP
        assert _nothing_pending(app)

        assert host.sync([POD_IP]) is True
        with _connect_from(node, 8080) as probe, _accept(app) as served:
            assert served.getpeername()[0] == PROBE
            served.sendall(b"ok")  # the reply finds its way back through the node's NAT
            assert probe.recv(8) == b"ok"
        assert _nothing_pending(inbound)

        # The node only forwards this one: no local socket, so no SNAT, so captured.
        with _connect_from(client, 8080), _accept(inbound) as captured:
            assert captured.getpeername()[0] == CLIENT_IP
            assert original_dst(captured) == (POD_IP, 8080)
        assert _nothing_pending(app)

        # The probe exception stops at the proxy's ports: a "probe" to 15001 is
        # redirected like anything else, never handed to the outbound listener.
        with _connect_from(node, 15001), _accept(inbound) as captured:
            assert captured.getpeername()[0] == PROBE
            assert original_dst(captured) == (POD_IP, 15001)
        assert _nothing_pending(outbound)


def test_sync_is_idempotent_and_an_empty_set_or_remove_leaves_nothing(
        topology: tuple[PodNetwork, str, str]) -> None:
    _pod, node_ns, _client = topology
    host = HostProbeRules(f"/run/netns/{node_ns}")
    assert host.sync([POD_IP, "198.18.210.3"]) is True
    first = _nat(node_ns)
    assert first.count(f"-j SNAT --to-source {PROBE}") == 2
    assert first.count(f"-A POSTROUTING -j {CHAIN}") == 1
    assert host.sync([POD_IP, "198.18.210.3"]) is False  # same set: not even a save
    # A restarted agent applies the same set again: nothing changes.
    assert HostProbeRules(f"/run/netns/{node_ns}").sync([POD_IP, "198.18.210.3"]) is True
    assert _strip(_nat(node_ns)) == _strip(first)
    assert host.sync([POD_IP]) is True
    assert _nat(node_ns).count("-j SNAT") == 1
    assert host.sync([]) is True
    assert "TRELLIS" not in _nat(node_ns)
    host.sync([POD_IP])
    host.remove()
    host.remove()
    assert "TRELLIS" not in _nat(node_ns)


def _strip(save: str) -> str:
    return "".join(line for line in save.splitlines(keepends=True) if not line.startswith("#"))
