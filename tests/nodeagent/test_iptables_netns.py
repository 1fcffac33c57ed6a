"""The iptables redirector in real namespaces (root): idempotent, removable, and working.

Functional tests play the proxy's part with the real socket factory: listeners
on 15001/15006/15008 made inside the pod's namespace, marked sockets for the
proxy's own connects, and unmarked ones for the app.
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid

import pytest

from nodeagent.iptables import IptablesRedirector, render_rules
from nodeagent.redirect import PodNetwork, RedirectError
from tunnel.config import PROXY_MARK
from tunnel.netns import NetnsHandle, listen_in, original_dst, socket_in

pytestmark = pytest.mark.netns

POD_IP = "198.18.200.2"
REDIRECTOR = IptablesRedirector()


def _save(ns: str) -> str:
    out = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "iptables-save"],
                         capture_output=True, text=True, check=True).stdout
    return "".join(line + "\n" for line in out.splitlines() if not line.startswith("#"))


def _our_ip_rules(ns: str) -> list[str]:
    out = subprocess.run(["ip", "-n", ns, "rule"], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if "fwmark 0x111/0xfff lookup 100" in line]


def _table_100(ns: str) -> list[str]:
    out = subprocess.run(["ip", "-n", ns, "route", "show", "table", "100"],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _pod(ns: str, ip: str = POD_IP, path: str = "") -> PodNetwork:
    return PodNetwork(uid=f"uid-{ns}", key="demo/app-1", netns_path=path or f"/run/netns/{ns}",
                      ip=ip)


@pytest.fixture
def pod(netns: str, add_stub_link) -> PodNetwork:  # type: ignore[no-untyped-def]
    add_stub_link(netns, f"{POD_IP}/24")
    return _pod(netns)


def _accept(listener, timeout: float = 2.0):  # type: ignore[no-untyped-def]
    listener.settimeout(timeout)
    conn, _peer = listener.accept()
    return conn


def _connect(sock, address: tuple[str, int], timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    sock.settimeout(timeout)
    sock.connect(address)


def _nothing_pending(listener) -> bool:  # type: ignore[no-untyped-def]
    listener.setblocking(False)
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return True
    return False


# -- lifecycle ---------------------------------------------------------------------------

def test_apply_twice_changes_nothing_the_second_time(netns: str, pod: PodNetwork) -> None:
    REDIRECTOR.apply(pod)
    first = _save(netns)
    REDIRECTOR.apply(pod)
    assert _save(netns) == first
    rendered = {line for line in render_rules(POD_IP).splitlines() if line.startswith("-A")}
    assert rendered <= set(first.splitlines())
    assert first.count("-A PREROUTING -j TRELLIS_PRERT") == 2  # one jump in mangle, one in nat
    assert first.count("-A OUTPUT -j TRELLIS_OUTPUT") == 2
    rules = _our_ip_rules(netns)
    assert len(rules) == 1 and rules[0].startswith("32764:")
    routes = _table_100(netns)
    assert len(routes) == 1 and routes[0].startswith("local default dev lo")


def test_remove_leaves_nothing_and_can_repeat(netns: str, pod: PodNetwork) -> None:
    REDIRECTOR.apply(pod)
    REDIRECTOR.remove(pod)
    assert "TRELLIS" not in _save(netns)
    assert _our_ip_rules(netns) == []
    assert _table_100(netns) == []
    REDIRECTOR.remove(pod)
    assert "TRELLIS" not in _save(netns)


class _Recording(IptablesRedirector):
    """The real redirector, noting every command it runs and in which namespace."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[tuple[int, str]] = []

    def _run(self, pod: PodNetwork, ns: NetnsHandle, argv: list[str],
             stdin: str | None = None) -> str:
        self.ran.append((ns.inode, argv[0]))
        return super()._run(pod, ns, argv, stdin)


def test_remove_of_a_vanished_namespace_is_harmless(
        netns: str, pod: PodNetwork, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trellis.nodeagent.redirect")
    recording = _Recording()
    # Returns quietly, runs no command anywhere (not in the agent's own
    # namespace, where a fall-through would strip the node's rules), and does
    # not claim a removal it did not do.
    recording.remove(_pod("x", path=f"/run/netns/trl-gone-{uuid.uuid4().hex[:8]}"))
    assert recording.ran == []
    assert "redirection removed" not in caplog.text
    # Positive control, same redirector and log: a namespace that is there is
    # entered, cleaned, and the removal logged.
    recording.apply(pod)
    assert "TRELLIS" in _save(netns)
    recording.ran.clear()
    recording.remove(pod)
    with NetnsHandle(pod.netns_path) as handle:
        assert (handle.inode, "iptables-save") in recording.ran
    assert "TRELLIS" not in _save(netns)
    assert "redirection removed" in caplog.text


def test_failures_name_the_pod(netns: str) -> None:
    missing = _pod("x", path=f"/run/netns/trl-gone-{uuid.uuid4().hex[:8]}")
    with pytest.raises(RedirectError, match=r"pod demo/app-1 \(netns /run/netns/trl-gone-"):
        REDIRECTOR.apply(missing)
    with pytest.raises(RedirectError, match=r"demo/app-1.*'1\.2\.3' is not an IPv4 address"):
        REDIRECTOR.apply(_pod(netns, ip="1.2.3"))


def test_a_proc_pid_path_names_the_same_namespace(netns: str) -> None:
    holder = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "60"])
    try:
        path = f"/proc/{holder.pid}/ns/net"
        with NetnsHandle(f"/run/netns/{netns}") as target:
            deadline = time.monotonic() + 5
            while NetnsHandle(path).inode != target.inode:  # until the child has moved
                assert time.monotonic() < deadline, "the holder never entered the namespace"
                time.sleep(0.01)
        pod = _pod(netns, path=path)
        REDIRECTOR.apply(pod)
        assert "TRELLIS_OUTPUT" in _save(netns)
        REDIRECTOR.remove(pod)
        assert "TRELLIS" not in _save(netns)
    finally:
        holder.kill()
        holder.wait()


# -- traffic -----------------------------------------------------------------------------

def test_outbound_tcp_lands_on_15001_with_its_original_destination(pod: PodNetwork) -> None:
    REDIRECTOR.apply(pod)
    with NetnsHandle(pod.netns_path) as ns, listen_in(ns, 15001) as proxy, \
            socket_in(ns) as app:
        _connect(app, ("198.18.200.1", 9999))  # nobody there: only the redirect answers
        with _accept(proxy) as conn:
            assert original_dst(conn) == ("198.18.200.1", 9999)


def test_the_proxy_mark_is_not_redirected(netns: str, pod: PodNetwork) -> None:
    subprocess.run(["ip", "-n", netns, "addr", "add", "198.18.200.3/32", "dev", "eth0"],
                   check=True)
    REDIRECTOR.apply(pod)
    with NetnsHandle(pod.netns_path) as ns, listen_in(ns, 15001) as proxy, \
            listen_in(ns, 9999, host="198.18.200.3", mark=None) as target:
        with socket_in(ns, mark=PROXY_MARK) as marked:
            _connect(marked, ("198.18.200.3", 9999))
            _accept(target).close()
        assert _nothing_pending(proxy)
        with socket_in(ns) as unmarked:  # the control: same destination, no mark
            _connect(unmarked, ("198.18.200.3", 9999))
            with _accept(proxy) as conn:
                assert original_dst(conn) == ("198.18.200.3", 9999)


def test_inbound_tcp_lands_on_15006_but_hbone_reaches_15008(
        netns: str, peer_netns: str, connect_veth) -> None:  # type: ignore[no-untyped-def]
    pod_ip, client_ip = "198.18.201.2", "198.18.201.1"
    connect_veth(netns, f"{pod_ip}/24", peer_netns, f"{client_ip}/24")
    pod = _pod(netns, ip=pod_ip)
    with NetnsHandle(pod.netns_path) as ns, NetnsHandle(f"/run/netns/{peer_netns}") as client, \
            listen_in(ns, 15006) as plaintext, listen_in(ns, 15008) as hbone, \
            listen_in(ns, 8080, mark=None) as app:
        with socket_in(client) as before:  # not enrolled yet: straight to the app
            _connect(before, (pod_ip, 8080))
            _accept(app).close()

        REDIRECTOR.apply(pod)
        with socket_in(client) as sock:
            _connect(sock, (pod_ip, 8080))
            with _accept(plaintext) as conn:
                assert original_dst(conn) == (pod_ip, 8080)
                assert conn.getpeername()[0] == client_ip
        assert _nothing_pending(app)
        with socket_in(client) as sock:
            _connect(sock, (pod_ip, 15008))
            _accept(hbone).close()
        assert _nothing_pending(plaintext)


def test_replies_to_a_transparent_connect_return_to_the_proxy(
        netns: str, add_stub_link) -> None:  # type: ignore[no-untyped-def]
    """The inbound delivery path: the proxy connects to the app *as the client's IP*.
    Without the mangle rules and table 100 the app's replies leave by the default
    route; with them they come back. Strict reverse-path filtering does not matter."""
    add_stub_link(netns, f"{POD_IP}/24")
    subprocess.run(["ip", "-n", netns, "route", "add", "default", "dev", "eth0"], check=True)
    for conf in ("all", "lo", "eth0"):
        subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw",
                        f"net.ipv4.conf.{conf}.rp_filter=1"], check=True)
    client_ip = "198.18.9.9"  # foreign to the pod

    def transparent_connect(ns: NetnsHandle, timeout: float):  # type: ignore[no-untyped-def]
        sock = socket_in(ns, mark=PROXY_MARK, transparent=True)
        try:
            sock.bind((client_ip, 0))
            _connect(sock, (POD_IP, 8080), timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    pod = _pod(netns)
    with NetnsHandle(pod.netns_path) as ns, listen_in(ns, 8080, host=POD_IP, mark=None) as app:
        with pytest.raises(TimeoutError):
            transparent_connect(ns, 0.5).close()

        REDIRECTOR.apply(pod)
        with transparent_connect(ns, 2.0) as proxy_side, _accept(app) as app_side:
            assert app_side.getpeername()[0] == client_ip
            app_side.sendall(b"hello proxy")
            proxy_side.settimeout(2)
            assert proxy_side.recv(64) == b"hello proxy"
