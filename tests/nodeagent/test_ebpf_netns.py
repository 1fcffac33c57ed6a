"""The eBPF redirector in real namespaces and cgroups (root): capture, scoping, pins.

The test process plays the proxy (its sockets live in its own cgroup, as the
agent's do); "the app" is a child process moved into the pod's cgroup v2
directory before it execs into the pod's namespace. Each test uses its own
bpffs root and cgroup and leaves neither behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent import bpf_sys
from nodeagent.ebpf import EbpfRedirector
from nodeagent.ebpf_routing import RETURN_RULES
from nodeagent.ebpf_support import cgroup2_mount
from nodeagent.host_probe import HostProbeRules
from nodeagent.iptables import PROBE_SOURCE
from nodeagent.redirect import PodNetwork, RedirectError
from tunnel.config import PROXY_MARK
from tunnel.netns import NetnsHandle, inside, listen_in, original_dst, socket_in

pytestmark = pytest.mark.netns

POD_IP, PEER_IP = "198.18.201.2", "198.18.201.1"


@pytest.fixture
def cgroup() -> Iterator[str]:
    path = Path(cgroup2_mount()) / f"trellis-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield str(path)
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            subprocess.run(["kill", "-9", pid], check=False)
        path.rmdir()


@pytest.fixture
def bpf_root() -> Iterator[str]:
    root = f"/sys/fs/bpf/trellis/test-{uuid.uuid4().hex[:8]}"
    yield root
    assert not os.path.exists(root), "the redirector left pins behind"


@pytest.fixture
def pod(netns: str, peer_netns: str, cgroup: str, connect_veth) -> PodNetwork:  # type: ignore[no-untyped-def]
    connect_veth(netns, f"{POD_IP}/24", peer_netns, f"{PEER_IP}/24")
    return PodNetwork(uid=f"demo/app-{netns}", key="demo/app-1",
                      netns_path=f"/run/netns/{netns}", ip=POD_IP, cgroup=cgroup)


@pytest.fixture
def redirector(bpf_root: str, pod: PodNetwork) -> Iterator[EbpfRedirector]:
    r = EbpfRedirector(bpf_root)
    try:
        yield r
    finally:
        r.remove(pod)


def _app_connect(pod: PodNetwork, host: str, port: int, *, mark: int = 0,
                 reset: bool = False) -> str:
    """Connect from a process in the pod's cgroup and namespace; its peer, or the error.
    The process then exits, closing with a FIN (or a RST with ``reset``)."""
    code = ("import socket,struct,sys\n"
            "s=socket.socket()\n"
            f"if {mark}: s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, {mark})\n"
            f"if {reset}: s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,"
            " struct.pack('ii', 1, 0))\n"
            "s.settimeout(3)\n"
            f"try:\n s.connect(({host!r},{port})); print('%s:%d' % s.getpeername())\n"
            "except OSError as e: print('error', e.errno)\n")
    shell = (f"echo $$ > {pod.cgroup}/cgroup.procs && "
             f'exec nsenter --net={pod.netns_path} "$0" -c "$1"')
    done = subprocess.run(["sh", "-c", shell, sys.executable, code], capture_output=True,
                          text=True, timeout=10, check=True)
    return done.stdout.strip()


def _accept(listener: socket.socket) -> socket.socket:
    listener.settimeout(3)
    return listener.accept()[0]


def _cgroup_progs(cgroup: str) -> list[dict[str, object]]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip() or "[]")


def _tcx(netns: str) -> list[int]:
    """Programs on the pod's eth0 tcx ingress (Debian 12's bpftool predates tcx)."""
    with NetnsHandle(f"/run/netns/{netns}") as ns, inside(ns):
        return bpf_sys.prog_query(socket.if_nametoindex("eth0"), bpf_sys.TCX_INGRESS, "tcx")


# -- outbound ---------------------------------------------------------------------------

def test_app_connect_lands_on_15001_with_the_original_destination(
        redirector: EbpfRedirector, pod: PodNetwork) -> None:
    redirector.apply(pod)
    with NetnsHandle(pod.netns_path) as ns, listen_in(ns, 15001) as outbound:
        assert _app_connect(pod, PEER_IP, 8080) == "127.0.0.1:15001"
        with _accept(outbound) as conn:
            assert original_dst(conn) == (PEER_IP, 8080)


def test_proxy_marked_loopback_and_hbone_connects_are_not_redirected(
        redirector: EbpfRedirector, pod: PodNetwork, peer_netns: str) -> None:
    redirector.apply(pod)
    with NetnsHandle(pod.netns_path) as ns, listen_in(ns, 15001) as outbound, \
            NetnsHandle(f"/run/netns/{peer_netns}") as peer, \
            listen_in(peer, 8080, mark=None) as peer_app, \
            listen_in(peer, 15008, mark=None) as peer_hbone, \
            listen_in(ns, 9000, host="127.0.0.1", mark=None) as local:
        # The proxy's own socket: another cgroup, so connect4 never runs for it.
        sock = socket_in(ns, mark=PROXY_MARK)
        sock.setblocking(True)
        sock.settimeout(3)
        sock.connect((PEER_IP, 8080))
        _accept(peer_app).close()
        sock.close()
        # In the pod's cgroup: marked, HBONE and loopback connects go where they were sent.
        assert _app_connect(pod, PEER_IP, 8080, mark=PROXY_MARK) == f"{PEER_IP}:8080"
        _accept(peer_app).close()
        assert _app_connect(pod, PEER_IP, 15008) == f"{PEER_IP}:15008"
        _accept(peer_hbone).close()
        assert _app_connect(pod, "127.0.0.1", 9000) == "127.0.0.1:9000"
        _accept(local).close()
        outbound.setblocking(False)
        with pytest.raises(BlockingIOError):
            outbound.accept()


def test_a_pod_that_is_not_enrolled_is_left_alone(
        bpf_root: str, pod: PodNetwork, peer_netns: str) -> None:
    with NetnsHandle(f"/run/netns/{peer_netns}") as peer, \
            listen_in(peer, 8080, mark=None) as peer_app:
        assert _app_connect(pod, PEER_IP, 8080) == f"{PEER_IP}:8080"
        _accept(peer_app).close()


# -- inbound and the return path ------------------------------------------------------

def test_inbound_keeps_the_client_ip_and_the_app_answers_the_proxy(
        redirector: EbpfRedirector, pod: PodNetwork, peer_netns: str) -> None:
    redirector.apply(pod)
    with NetnsHandle(pod.netns_path) as ns, listen_in(ns, 15006) as inbound, \
            listen_in(ns, 8080, mark=None) as app, \
            NetnsHandle(f"/run/netns/{peer_netns}") as peer:
        client = socket_in(peer)
        client.setblocking(True)
        client.settimeout(3)
        client.connect((POD_IP, 8080))
        with client, _accept(inbound) as accepted:
            assert accepted.getpeername()[0] == PEER_IP
            assert original_dst(accepted) == (POD_IP, 8080)
            # The proxy's transparent connect to the app, as tunnel/upstream.py makes it.
            upstream = socket_in(ns, mark=PROXY_MARK, transparent=True)
            upstream.setblocking(True)
            upstream.settimeout(3)
            upstream.bind((PEER_IP, 0))
            upstream.connect((POD_IP, 8080))
            with upstream, _accept(app) as served:
                assert served.getpeername()[0] == PEER_IP
                served.sendall(b"reply")  # routed back over lo, not out of the pod
                assert upstream.recv(16) == b"reply"


def test_no_netfilter_rules_in_the_pod(redirector: EbpfRedirector, pod: PodNetwork,
                                       netns: str) -> None:
    redirector.apply(pod)
    save = subprocess.run(["ip", "netns", "exec", netns, "iptables-save"], capture_output=True,
                          text=True, check=True).stdout
    assert "TRELLIS" not in save and "-A" not in save
    nft = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "ruleset"],
                         capture_output=True, text=True, check=False)
    assert nft.stdout.strip() == ""


# -- pins, restarts, removal -----------------------------------------------------------

def test_apply_twice_and_after_a_restart_attaches_nothing_twice(
        bpf_root: str, redirector: EbpfRedirector, pod: PodNetwork, netns: str) -> None:
    redirector.apply(pod)
    first = _cgroup_progs(pod.cgroup)
    assert sorted(str(p["attach_type"]) for p in first) == ["cgroup_inet4_connect",
                                                            "cgroup_sock_ops"]
    assert len(_tcx(netns)) == 1
    redirector.apply(pod)
    EbpfRedirector(bpf_root).apply(pod)  # a restarted agent: same pins, nothing new
    assert _cgroup_progs(pod.cgroup) == first
    assert len(_tcx(netns)) == 1
    with NetnsHandle(pod.netns_path) as ns, listen_in(ns, 15001) as outbound:
        assert _app_connect(pod, PEER_IP, 8081) == "127.0.0.1:15001"
        with _accept(outbound) as conn:
            assert original_dst(conn) == (PEER_IP, 8081)


def test_remove_detaches_and_unpins_everything(bpf_root: str, pod: PodNetwork,
                                               netns: str) -> None:
    redirector = EbpfRedirector(bpf_root)
    redirector.apply(pod)
    prog_ids = {p["id"] for p in _cgroup_progs(pod.cgroup)}
    assert os.path.exists(f"{bpf_root}/getsockopt")
    redirector.remove(pod)
    redirector.remove(pod)  # idempotent
    assert _cgroup_progs(pod.cgroup) == []
    assert _tcx(netns) == []
    assert not os.path.exists(bpf_root)
    rules = subprocess.run(["ip", "-n", netns, "rule"], capture_output=True, text=True,
                           check=True).stdout
    assert not [line for line in rules.splitlines()
                if line.split(":")[0] in {str(p) for p, _s, _t in RETURN_RULES}]
    loaded = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                       text=True, check=True).stdout)
    assert prog_ids.isdisjoint({p["id"] for p in loaded})


def test_a_pod_without_a_cgroup_is_refused_by_name(bpf_root: str, pod: PodNetwork) -> None:
    bare = PodNetwork(uid=pod.uid, key=pod.key, netns_path=pod.netns_path, ip=pod.ip)
    with pytest.raises(RedirectError, match=r"trellis.dev/cgroup"):
        EbpfRedirector(bpf_root).apply(bare)


def test_a_restarted_agent_in_another_cgroup_moves_getsockopt_there(
        bpf_root: str, redirector: EbpfRedirector, pod: PodNetwork) -> None:
    old_home = Path(cgroup2_mount()) / f"trellis-test-agent-{uuid.uuid4().hex[:8]}"
    old_home.mkdir()
    try:
        EbpfRedirector(bpf_root, proxy_cgroup=str(old_home)).apply(pod)
        assert [t for _i, t in _progs_of(str(old_home))] == ["cgroup_getsockopt"]
        redirector.apply(pod)  # this process's own cgroup, as a new agent pod's would be
        assert _progs_of(str(old_home)) == []
        with NetnsHandle(pod.netns_path) as ns, listen_in(ns, 15001) as outbound:
            assert _app_connect(pod, PEER_IP, 8082) == "127.0.0.1:15001"
            with _accept(outbound) as conn:
                assert original_dst(conn) == (PEER_IP, 8082)
    finally:
        old_home.rmdir()


def test_a_pod_cgroup_made_anew_is_attached_again(
        redirector: EbpfRedirector, pod: PodNetwork) -> None:
    redirector.apply(pod)
    os.rmdir(pod.cgroup)
    os.mkdir(pod.cgroup)
    assert _cgroup_progs(pod.cgroup) == []
    redirector.apply(pod)
    assert sorted(str(p["attach_type"]) for p in _cgroup_progs(pod.cgroup)) == [
        "cgroup_inet4_connect", "cgroup_sock_ops"]


def _progs_of(cgroup: str) -> list[tuple[int, str]]:
    return sorted((int(p["id"]), str(p["attach_type"])) for p in _cgroup_progs(cgroup))


# -- kubelet probes ---------------------------------------------------------------------

def test_a_host_probe_reaches_the_app_but_not_the_proxy_ports(
        redirector: EbpfRedirector, pod: PodNetwork, peer_netns: str) -> None:
    """The peer plays the node: its own sockets are SNATed to the probe source by the
    host rule (nodeagent/host_probe.py), and tc lets exactly that through to the app."""
    subprocess.run(["ip", "-n", os.path.basename(pod.netns_path), "route", "add", "default",
                    "via", PEER_IP], check=True)
    redirector.apply(pod)
    host = HostProbeRules(f"/run/netns/{peer_netns}")
    with NetnsHandle(pod.netns_path) as ns, listen_in(ns, 15006) as inbound, \
            listen_in(ns, 15001) as outbound, listen_in(ns, 8080, mark=None) as app, \
            NetnsHandle(f"/run/netns/{peer_netns}") as peer:
        def connect(port: int) -> socket.socket:
            client = socket_in(peer)
            client.setblocking(True)
            client.settimeout(3)
            client.connect((POD_IP, port))
            return client

        with connect(8080), _accept(inbound) as captured:  # control: no host rule yet
            assert captured.getpeername()[0] == PEER_IP
        try:
            host.sync([POD_IP])
            with connect(8080) as probe, _accept(app) as served:
                assert served.getpeername()[0] == PROBE_SOURCE
                served.sendall(b"ok")  # the reply to 169.254.7.127 leaves by main
                assert probe.recv(8) == b"ok"
            with connect(15001), _accept(inbound) as captured:
                assert captured.getpeername()[0] == PROBE_SOURCE
            outbound.setblocking(False)
            with pytest.raises(BlockingIOError):
                outbound.accept()
        finally:
            host.remove()


# -- SO_ORIGINAL_DST entries --------------------------------------------------------------

def _entries(bpf_root: str, name: str) -> list[object]:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", f"{bpf_root}/maps/{name}"],
                         capture_output=True, text=True, check=True).stdout
    return list(json.loads(out.strip() or "[]"))


def test_original_dst_is_answered_once_and_never_to_another_connection(
        bpf_root: str, redirector: EbpfRedirector, pod: PodNetwork) -> None:
    """The app connects and exits before the proxy accepts (a short-lived client):
    the proxy still reads the destination, once. A connect straight to
    127.0.0.1:15001 from the port that connect used (from another loopback
    address) must not read it, and a reset or failed connect leaves no entry."""
    redirector.apply(pod)
    with NetnsHandle(pod.netns_path) as ns, listen_in(ns, 15001) as outbound:
        assert _app_connect(pod, PEER_IP, 8080) == "127.0.0.1:15001"  # and the app exits
        with _accept(outbound) as first:
            _peer_ip, port = first.getpeername()
            assert original_dst(first) == (PEER_IP, 8080)
            with pytest.raises(OSError):
                original_dst(first)  # answered once: the entry went with the answer
        with socket_in(ns, mark=None) as direct:
            direct.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            direct.bind(("127.0.0.2", port))
            direct.setblocking(True)
            direct.settimeout(3)
            direct.connect(("127.0.0.1", 15001))
            with _accept(outbound) as second, pytest.raises(OSError):
                original_dst(second)
        assert _entries(bpf_root, "peer") == []

        # Read by nobody: the app resets its connection while it is still queued.
        assert _app_connect(pod, PEER_IP, 8081, reset=True) == "127.0.0.1:15001"
        assert _entries(bpf_root, "peer") == []
    # Never connected (nothing listens on 15001 now): the cookie's entry goes too.
    assert _app_connect(pod, PEER_IP, 8082) == "error 111"
    assert _entries(bpf_root, "orig") == []
