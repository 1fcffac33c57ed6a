"""Issue 17 in the lab: a node proxy upgraded as a ``maxSurge: 1`` DaemonSet does it,
with real ``trellis proxy run`` processes.

The lab's proxy of node-2 runs with no drain (``--drain-seconds 0``), so the test
first moves node-2 to a proxy X of its own that drains (a surge with no traffic),
then upgrades X to a proxy Y while backend-2 keeps opening connections through
the node's outbound capture, and only then stops X. Afterwards it stops Y and
lets ``lab up`` start the lab's proxy again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.labctl import curl_json, eventually, in_netns, node_netns, pod, trellis

pytestmark = pytest.mark.e2e

TRAFFIC_MAX = 80  # connections at most in the loop, and 90 s at most


def _pid(lab_dir: Path, process: str) -> int:
    return int((lab_dir / "pids" / f"{process}.pid").read_text())


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _ready(netns: str, port: int) -> bool:
    return in_netns(netns, "curl", "-sf", "--max-time", "2",
                    f"http://127.0.0.1:{port}/healthz/ready", check=False).returncode == 0


class _Proxy:
    """One more ``trellis proxy run`` for node-2, with the lab proxy's own command
    line and environment, its admin ports moved aside (the lab's node namespace is
    one; on Kubernetes each proxy pod has its own)."""

    def __init__(self, like: tuple[list[str], dict[bytes, bytes]], netns: str, admin: int,
                 log: Path) -> None:
        argv, env = like
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", netns, *argv,
                 "--metrics", f"127.0.0.1:{admin}", "--readiness", f"127.0.0.1:{admin + 1}",
                 "--drain-seconds", "10"],
                stdout=out, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def _command_of(pid: int) -> tuple[list[str], dict[bytes, bytes]]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    env = dict(item.split(b"=", 1) for item in
               Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    return [a.decode() for a in argv], env


@pytest.mark.lab_modes("iptables", "ebpf")  # eBPF: both proxies' cgroups answer getsockopt
def test_a_proxy_upgrade_surges_and_no_connection_fails(lab: dict, tmp_path: Path) -> None:
    lab_dir = Path(os.environ["TRELLIS_LAB_DIR"])
    netns = node_netns("node-2")
    lab_proxy = _pid(lab_dir, "proxy-node-2")
    agent_log = lab_dir / "logs" / "agent-node-2.log"
    socket_path = lab_dir / "sockets" / "node-2.sock"
    target = f"http://{pod('backend-1')['ip']}:8080/"
    like = _command_of(lab_proxy)
    started: list[_Proxy] = []
    try:
        # X beside the lab's proxy: ready only once the agent has moved to it.
        x = _Proxy(like, netns, 15030, tmp_path / "x.log")
        started.append(x)
        eventually(lambda: _ready(netns, 15031), timeout=60)
        assert "agent replay complete" in x.log.read_text()
        os.kill(lab_proxy, signal.SIGTERM)
        eventually(lambda: _gone(lab_proxy), timeout=30)
        assert socket_path.exists()  # the lab's proxy left X's socket in place
        assert curl_json("backend-2", target)["pod"] == "backend-1"  # through X

        outcomes: list[bool] = []
        stop = threading.Event()

        def traffic() -> None:
            deadline = time.monotonic() + 90
            while not stop.is_set() and len(outcomes) < TRAFFIC_MAX \
                    and time.monotonic() < deadline:
                try:
                    outcomes.append(curl_json("backend-2", target)["pod"] == "backend-1")
                except (AssertionError, ValueError, subprocess.TimeoutExpired):
                    outcomes.append(False)

        loop = threading.Thread(target=traffic, name="traffic")
        loop.start()
        try:
            eventually(lambda: len(outcomes) >= 3, timeout=30)
            y = _Proxy(like, netns, 15040, tmp_path / "y.log")
            started.append(y)
            eventually(lambda: _ready(netns, 15041), timeout=60)
            moved = len(outcomes)
            eventually(lambda: len(outcomes) >= moved + 3, timeout=30)
            x.stop()  # SIGTERM: listeners closed, then the drain
            gone = len(outcomes)
            eventually(lambda: len(outcomes) >= gone + 3, timeout=30)  # all through Y now
        finally:
            stop.set()
            loop.join(timeout=60)
        assert outcomes and all(outcomes), f"{outcomes.count(False)} of {len(outcomes)} failed"
        assert x.process.returncode == 0, x.log.read_text()[-2000:]
        assert agent_log.read_text().count("a newer node proxy is listening; moved to it") >= 2
        assert "agent replay complete" in y.log.read_text()
        assert socket_path.exists()  # X, stopping, left Y's socket
    finally:
        for proxy in reversed(started):
            proxy.stop()
        trellis("lab", "up", timeout=120)  # the lab's own proxy for node-2 again
    assert _pid(lab_dir, "proxy-node-2") != lab_proxy
    assert curl_json("backend-2", target)["pod"] == "backend-1"
