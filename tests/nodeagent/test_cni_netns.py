"""trellis-cni driven the way a container runtime drives it, against a real namespace.

Each test runs the installed ``trellis-cni`` executable with the CNI environment
and a chained network configuration (with ``prevResult``) on stdin, talking to
a real agent-side ``CniServer`` (its own event loop in a thread) that applies
the real iptables redirector in a fresh namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.cni_server import CniServer
from nodeagent.iptables import IptablesRedirector
from tunnel.state import AMBIENT, DATAPLANE_LABEL, MeshState

pytestmark = pytest.mark.netns

POD_IP = "198.18.210.7"
PLUGIN = Path(sys.executable).with_name("trellis-cni")
STATE = MeshState(namespace_labels={"demo": {DATAPLANE_LABEL: AMBIENT}, "plain": {}})


class _ServerThread:
    def __init__(self, path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = CniServer(path, IptablesRedirector(), lambda: STATE)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> _ServerThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # A short path: unix socket names are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="tcni-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(socket_dir: Path) -> Iterator[Path]:
    sock = socket_dir / "cni.sock"
    with _ServerThread(sock):
        yield sock


@pytest.fixture
def pod_ns(netns: str, add_stub_link) -> str:  # type: ignore[no-untyped-def]
    add_stub_link(netns, f"{POD_IP}/24")
    return netns


def _run(command: str, ns: str, sock: Path, *, namespace: str = "demo", version: str = "1.0.0",
         netns_path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": f"ctr-{ns}",
           "CNI_NETNS": f"/run/netns/{ns}" if netns_path is None else netns_path,
           "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web-1;"
                       f"K8S_POD_INFRA_CONTAINER_ID=ctr-{ns};K8S_POD_UID=uid-{ns}"}
    prev = {"cniVersion": version,
            "interfaces": [{"name": "eth0", "sandbox": f"/run/netns/{ns}"}],
            "ips": [{"address": f"{POD_IP}/24", "interface": 0}]}
    config = {"cniVersion": version, "name": "k8s-pod-network", "type": "trellis-cni",
              "agentSocket": str(sock), "timeoutSeconds": 20, "prevResult": prev}
    return subprocess.run([str(PLUGIN)], input=json.dumps(config), env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def _save(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "iptables-save"], capture_output=True,
                          text=True, check=True).stdout


def _redirected(ns: str) -> bool:
    save = _save(ns)
    return all(s in save for s in ("-A PREROUTING -j TRELLIS_PRERT",
                                   "-A OUTPUT -j TRELLIS_OUTPUT",
                                   "--to-ports 15001", "--to-ports 15006"))


def test_add_returns_only_with_redirection_in_place(pod_ns: str, agent: Path) -> None:
    assert not _redirected(pod_ns)
    done = _run("ADD", pod_ns, agent)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["ips"][0]["address"] == f"{POD_IP}/24"  # prevResult passed through
    assert _redirected(pod_ns)
    rules = subprocess.run(["ip", "-n", pod_ns, "rule"], capture_output=True, text=True,
                           check=True).stdout
    assert "fwmark 0x111/0xfff lookup 100" in rules


def test_add_for_a_pod_outside_the_mesh_leaves_it_alone(pod_ns: str, agent: Path) -> None:
    done = _run("ADD", pod_ns, agent, namespace="plain")
    assert done.returncode == 0, done.stdout
    assert "TRELLIS" not in _save(pod_ns)


def test_add_for_an_unknown_namespace_asks_to_try_again(pod_ns: str, agent: Path) -> None:
    done = _run("ADD", pod_ns, agent, namespace="not-synced-yet")
    assert done.returncode != 0
    assert json.loads(done.stdout)["code"] == 11
    assert "TRELLIS" not in _save(pod_ns)


def test_add_fails_with_a_cni_error_when_the_agent_is_unreachable(
        pod_ns: str, socket_dir: Path) -> None:
    done = _run("ADD", pod_ns, socket_dir / "nobody-listens.sock")
    assert done.returncode != 0
    error = json.loads(done.stdout)
    assert set(error) == {"cniVersion", "code", "msg", "details"}
    assert error["code"] == 11 and "unreachable" in error["msg"]
    assert "TRELLIS" not in _save(pod_ns)


def test_add_into_a_missing_namespace_fails(pod_ns: str, agent: Path) -> None:
    done = _run("ADD", pod_ns, agent, netns_path="/run/netns/trl-t-does-not-exist")
    assert done.returncode != 0
    assert "does-not-exist" in json.loads(done.stdout)["msg"]


def test_check_fails_before_add_and_passes_after(pod_ns: str, agent: Path) -> None:
    before = _run("CHECK", pod_ns, agent)
    assert before.returncode != 0 and json.loads(before.stdout)["code"] == 5
    assert _run("ADD", pod_ns, agent).returncode == 0
    after = _run("CHECK", pod_ns, agent)
    assert (after.returncode, after.stdout) == (0, "")


def test_del_removes_everything_and_twice_is_fine(pod_ns: str, agent: Path) -> None:
    assert _run("ADD", pod_ns, agent).returncode == 0
    for _ in range(2):
        done = _run("DEL", pod_ns, agent)
        assert (done.returncode, done.stdout) == (0, ""), done.stderr
        assert "TRELLIS" not in _save(pod_ns)


def test_del_succeeds_with_the_namespace_or_the_agent_gone(
        pod_ns: str, socket_dir: Path, agent: Path) -> None:
    assert _run("DEL", pod_ns, agent, netns_path="").returncode == 0
    assert _run("DEL", pod_ns, agent, netns_path="/run/netns/trl-t-gone").returncode == 0
    assert _run("DEL", pod_ns, socket_dir / "nobody-listens.sock").returncode == 0


def test_version() -> None:
    done = subprocess.run([str(PLUGIN)], input='{"cniVersion": "1.0.0"}',
                          env={"CNI_COMMAND": "VERSION"}, capture_output=True, text=True,
                          timeout=30, check=True)
    assert json.loads(done.stdout)["supportedVersions"][-1] == "1.0.0"
