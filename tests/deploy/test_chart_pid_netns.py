"""Why the chart gives hostPID to the agent's pod and not to the proxy's: in eBPF mode
the agent looks the proxy up by the pid SO_PEERCRED reports on the control socket.
The kernel reports that pid in the *reader's* PID namespace, so an agent in the
host's namespace (hostPID) sees the proxy's real pid even though the proxy runs in
a PID namespace of its own, and finds it in /proc; an agent in a namespace of its
own (no hostPID) would read 0. Root: unshare makes the PID namespaces.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tunnel.unix_socket import peer_credentials

pytestmark = pytest.mark.netns

# The "proxy": a control-socket listener in a PID namespace of its own, where it is pid 1.
PROXY = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.bind(sys.argv[1]); sock.listen(4)
print(os.getpid(), flush=True)
while True:
    conn, _ = sock.accept()
    conn.recv(1)
    conn.close()
"""
# An "agent" without hostPID: its own PID namespace, not an ancestor of the proxy's.
READER = """
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect(sys.argv[1])
print(struct.unpack("=iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0])
"""


@pytest.fixture
def proxy(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "proxy.sock"
    # --kill-child: pid 1 of a PID namespace ignores SIGTERM, and unshare passes SIGTERM
    # on to it; so unshare is killed, and takes the child with it.
    process = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", sys.executable,
                                "-c", PROXY, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        own_pid = int(process.stdout.readline())  # blocks until it listens
        yield path, own_pid
    finally:
        process.kill()
        process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()


def test_an_agent_with_host_pid_finds_a_proxy_in_its_own_pid_namespace(proxy) -> None:  # type: ignore[no-untyped-def]
    path, own_pid = proxy
    assert own_pid == 1  # the proxy really is in a PID namespace of its own
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(path))
        pid = peer_credentials(sock).pid
    assert pid > 1
    # The pid is one this (host) namespace can look up, and it is the proxy's.
    assert PROXY.strip().splitlines()[0] in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
        errors="replace").replace("\0", " ")
    assert "\n0::" in "\n" + Path(f"/proc/{pid}/cgroup").read_text()  # its cgroup v2 path


def test_an_agent_without_host_pid_reads_no_pid(proxy) -> None:  # type: ignore[no-untyped-def]
    # The control: the same question from a sibling PID namespace gets 0.
    path, _ = proxy
    done = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", READER, str(path)],
                          capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.strip() == "0"
