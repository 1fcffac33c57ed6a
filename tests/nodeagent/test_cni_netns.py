"""trellis-cni driven the way a container runtime drives it, against a real namespace.

Each test runs the plugin binary (the static C program ``make setup`` builds,
what the installer copies to the host) with the CNI environment and a chained
network configuration (with ``prevResult``) on stdin, talking to a real
agent-side ``CniServer`` (its own event loop in a thread) that applies the real
iptables redirector in a fresh namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.cni import spec
from nodeagent.cni.install import BUILT_PLUGIN
from nodeagent.cni_server import CniServer
from nodeagent.iptables import IptablesRedirector
from tunnel.state import AMBIENT, DATAPLANE_LABEL, MeshState

pytestmark = pytest.mark.netns

POD_IP = "198.18.210.7"
PLUGIN = BUILT_PLUGIN
STATE = MeshState(namespace_labels={"demo": {DATAPLANE_LABEL: AMBIENT}, "plain": {}})
EXCLUDED = ["kube-system", "trellis-system"]


class _ServerThread:
    def __init__(self, path: Path, state: MeshState | None = STATE) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = CniServer(path, IptablesRedirector(), lambda: state)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> _ServerThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    async def _close(self) -> None:
        self.server.close()
        await asyncio.sleep(0.01)  # lets the cancelled fallback publisher finish

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
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
         netns_path: str | None = None, name: str = "web-1",
         excluded: list[str] = EXCLUDED) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": f"ctr-{ns}",
           "CNI_NETNS": f"/run/netns/{ns}" if netns_path is None else netns_path,
           "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};"
                       f"K8S_POD_INFRA_CONTAINER_ID=ctr-{ns};K8S_POD_UID=uid-{ns}"}
    prev = {"cniVersion": version,
            "interfaces": [{"name": "eth0", "sandbox": f"/run/netns/{ns}"}],
            "ips": [{"address": f"{POD_IP}/24", "interface": 0}]}
    config = {"cniVersion": version, "name": "k8s-pod-network", "type": "trellis-cni",
              "agentSocket": str(sock), "timeoutSeconds": 20, "excludeNamespaces": excluded,
              "prevResult": prev}
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
    assert error["code"] == 11 and "not running" in error["msg"]
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


# -- no agent: who passes, who waits (issue 17, defect 4) ----------------------------------

def _timed(*args, **kwargs) -> tuple[subprocess.CompletedProcess[str], float]:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    done = _run(*args, **kwargs)
    return done, time.monotonic() - started


def test_with_the_agent_gone_only_pods_that_may_be_in_the_mesh_wait(
        pod_ns: str, socket_dir: Path) -> None:
    sock = socket_dir / "cni.sock"
    fallback = sock.with_name("cni.sock.fallback")
    with _ServerThread(sock) as agent:
        # Positive control: with the agent there, the ambient pod is redirected.
        assert _run("ADD", pod_ns, sock).returncode == 0 and _redirected(pod_ns)
        assert _run("DEL", pod_ns, sock).returncode == 0 and not _redirected(pod_ns)
        deadline = time.monotonic() + 5
        while not fallback.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fallback.read_text().splitlines()[1:] == ["wait demo", "pass plain"]
        assert agent.server.fallback_path == fallback
    assert not sock.exists()  # the agent is gone (pod replaced); its verdicts stay
    cases = [("kube-system", "coredns-1", 0), ("trellis-system", "trellis-agent-x1", 0),
             ("plain", "web-1", 0), ("demo", "web-1", 11), ("created-while-away", "p", 11)]
    for namespace, name, code in cases:
        done, took = _timed("ADD", pod_ns, sock, namespace=namespace, name=name)
        assert took < 2.0, f"{namespace}/{name} waited {took:.1f} s"  # timeoutSeconds is 20
        if code == 0:
            assert done.returncode == 0, (namespace, done.stdout, done.stderr)
            assert json.loads(done.stdout)["ips"][0]["address"] == f"{POD_IP}/24"
        else:
            assert done.returncode != 0, (namespace, done.stdout)
            error = json.loads(done.stdout)
            assert error["code"] == code and namespace in error["details"], error
    assert "TRELLIS" not in _save(pod_ns)
    # A stale socket file with nobody listening is the same as no socket.
    sock.touch()
    assert _run("ADD", pod_ns, sock, namespace="plain").returncode == 0
    assert json.loads(_run("ADD", pod_ns, sock).stdout)["code"] == 11
    # The next agent, before its first snapshot, goes by the verdicts it inherited.
    with _ServerThread(sock, state=None):
        assert _run("ADD", pod_ns, sock, namespace="plain").returncode == 0
        assert json.loads(_run("ADD", pod_ns, sock).stdout)["code"] == 11
    assert "TRELLIS" not in _save(pod_ns)


def test_excluded_namespaces_never_ask_the_agent(pod_ns: str, socket_dir: Path) -> None:
    # An agent that has not synced answers "try again later" for everyone it is asked about.
    sock = socket_dir / "cni.sock"
    with _ServerThread(sock, state=None):
        assert json.loads(_run("ADD", pod_ns, sock, namespace="plain").stdout)["code"] == 11
        for namespace in EXCLUDED:
            done = _run("ADD", pod_ns, sock, namespace=namespace)
            assert done.returncode == 0, done.stdout
        done = _run("ADD", pod_ns, sock, namespace="kube-system", excluded=[])
        assert json.loads(done.stdout)["code"] == 11  # not excluded by config: asked


def test_the_plugin_needs_nothing_from_the_host(tmp_path: Path) -> None:
    """No interpreter, no libc: it runs alone in an empty root directory."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(PLUGIN, root / "trellis-cni")

    def enter_root() -> None:
        os.chroot(root)
        os.chdir("/")

    done = subprocess.run(["/trellis-cni"], input='{"cniVersion": "0.4.0"}',
                          env={"CNI_COMMAND": "VERSION"}, capture_output=True, text=True,
                          timeout=30, check=False, preexec_fn=enter_root)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"cniVersion": "0.4.0",
                                       "supportedVersions": list(spec.SUPPORTED_VERSIONS)}
    assert PLUGIN.stat().st_size < 200_000
