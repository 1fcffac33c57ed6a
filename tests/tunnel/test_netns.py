"""The in-namespace socket factory, against real namespaces (root).

Every test checks that the calling thread ends where it started: a thread left
in a pod's namespace would silently open the proxy's next sockets there.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import subprocess
import threading

import pytest

from tunnel import config
from tunnel.netns import (
    CLONE_NEWNET,
    SO_ORIGINAL_DST,
    NetnsError,
    NetnsHandle,
    inside,
    listen_in,
    original_dst,
    socket_in,
)

pytestmark = pytest.mark.netns

ADDRESS = "198.18.100.1"


def _thread_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _add_link(ns: str, cidr: str) -> None:
    """An interface that goes nowhere, carrying ``cidr``: dummy, or a bridge where
    the kernel has no dummy driver."""
    for kind in ("dummy", "bridge"):
        made = subprocess.run(["ip", "-n", ns, "link", "add", "name", "trl0", "type", kind],
                              capture_output=True, check=False)
        if made.returncode == 0:
            break
    else:
        pytest.fail(f"cannot create a dummy or bridge link: {made.stderr.decode()}")
    subprocess.run(["ip", "-n", ns, "addr", "add", cidr, "dev", "trl0"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "trl0", "up"], check=True)


@pytest.fixture
def handle(netns: str):  # type: ignore[no-untyped-def]
    _add_link(netns, f"{ADDRESS}/24")
    with NetnsHandle(f"/run/netns/{netns}") as h:
        yield h


def test_a_socket_binds_an_address_that_exists_only_in_its_namespace(handle: NetnsHandle) -> None:
    before = _thread_netns()
    host_addresses = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True,
                                    text=True, check=True).stdout
    assert ADDRESS not in host_addresses
    with socket_in(handle) as sock:
        sock.bind((ADDRESS, 0))
        assert sock.getsockname()[0] == ADDRESS
        assert not sock.getblocking()
    assert _thread_netns() == before


def test_options_are_set(handle: NetnsHandle) -> None:
    with socket_in(handle, mark=0x539, transparent=True) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x539
        assert sock.getsockopt(socket.SOL_IP, socket.IP_TRANSPARENT) == 1
    with socket_in(handle) as plain:
        assert plain.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
        assert plain.getsockopt(socket.SOL_IP, socket.IP_TRANSPARENT) == 0


def test_listener_accepts_inside_its_namespace(handle: NetnsHandle) -> None:
    with listen_in(handle, 15001) as listener:
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == config.PROXY_MARK
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        with socket_in(handle) as client:
            client.setblocking(True)
            client.connect((ADDRESS, 15001))
        # SO_REUSEPORT: a second proxy (an upgrade) binds next to the first.
        listen_in(handle, 15001).close()


def test_the_thread_returns_after_an_error(handle: NetnsHandle) -> None:
    before = _thread_netns()
    with pytest.raises(OSError):
        socket_in(handle, family=12345)  # socket() fails while inside the namespace
    assert _thread_netns() == before
    with listen_in(handle, 15008), pytest.raises(NetnsError, match="15008"):
        listen_in(handle, 15008, reuse_port=False)
    assert _thread_netns() == before


def test_a_path_that_is_not_a_network_namespace_is_refused() -> None:
    before = _thread_netns()
    with NetnsHandle("/proc/self/ns/uts") as uts, pytest.raises(NetnsError, match="ns/uts"):
        socket_in(uts)
    assert _thread_netns() == before


def test_handle_errors_name_the_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "gone"
    with pytest.raises(NetnsError, match=str(missing)) as err:
        NetnsHandle(str(missing))
    assert err.value.errno == errno.ENOENT
    handle = NetnsHandle("/proc/self/ns/net")
    handle.close()
    handle.close()  # twice is harmless
    assert handle.closed
    with pytest.raises(NetnsError, match="closed"):
        socket_in(handle)


def test_handle_pins_one_namespace(netns: str) -> None:
    with NetnsHandle(f"/run/netns/{netns}") as a, NetnsHandle.open(f"/run/netns/{netns}") as b:
        assert a.inode == b.inode != _thread_netns()


def test_other_threads_each_return_to_their_own_namespace(handle: NetnsHandle) -> None:
    """A thread someone moved on purpose goes back there, not to the process's home."""
    results: dict[str, object] = {}
    libc = ctypes.CDLL(None, use_errno=True)
    other = NetnsHandle(f"/proc/{os.getpid()}/ns/net")  # the home namespace

    def moved_thread() -> None:
        try:
            assert libc.setns(handle.fileno(), CLONE_NEWNET) == 0
            start = _thread_netns()
            socket_in(other).close()
            results["moved"] = (start, _thread_netns())
        finally:
            libc.setns(other.fileno(), CLONE_NEWNET)

    def plain_thread() -> None:
        start = _thread_netns()
        for _ in range(50):
            socket_in(handle).close()
        results["plain"] = (start, _thread_netns())

    threads = [threading.Thread(target=moved_thread), threading.Thread(target=plain_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert results["moved"][0] == results["moved"][1] == handle.inode  # type: ignore[index]
    plain_start, plain_end = results["plain"]  # type: ignore[misc]
    assert plain_start == plain_end != handle.inode


def test_inside_runs_a_block_in_the_namespace(handle: NetnsHandle) -> None:
    before = _thread_netns()
    with inside(handle):
        assert _thread_netns() == handle.inode
    assert _thread_netns() == before


def test_the_proxy_mark_matches_the_proxy_config() -> None:
    import inspect
    assert inspect.signature(listen_in).parameters["mark"].default == config.PROXY_MARK


class _FakeSocket:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option, size) == (socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return self.raw


def test_original_dst_parses_a_sockaddr_in() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 9999) \
        + socket.inet_aton("198.18.200.1") + bytes(8)
    assert original_dst(_FakeSocket(raw)) == ("198.18.200.1", 9999)  # type: ignore[arg-type]


def test_original_dst_refuses_other_families() -> None:
    raw = struct.pack("=H", socket.AF_INET6) + bytes(14)
    with pytest.raises(OSError, match="family"):
        original_dst(_FakeSocket(raw))  # type: ignore[arg-type]
