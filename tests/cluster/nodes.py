"""The machines of the harness's "cluster": a control namespace with the fabric bridge
(where the API server listens), and nodes. A node is a network namespace (uplink to
the fabric, a pod bridge, routes to the other nodes' pods), a PID namespace of its
own whose PID 1 sleeps in that network namespace (so ``hostPID`` containers see the
node's processes, and ``/proc/1/ns/net`` is the node's network), a cgroup subtree,
and a directory standing in for its root filesystem (hostPath volumes, the CNI
directories, the runtime's netns mounts stay the machine's ``/run/netns``).

Addresses (198.18.0.0/15, apart from the lab's 198.18.x and its VIPs 198.19.0.x):
fabric 198.19.220.0/24 (control .1, node i .(10+i)); node i's pods
198.19.(220+i).0/24, gateway .1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from lab import network as labnet
from lab import nsenter
from nodeagent.ebpf_support import cgroup2_mount

PREFIX = "tclu-"
CONTROL_NETNS = f"{PREFIX}ctl"
API_ADDRESS = "198.19.220.1"
FABRIC_BRIDGE, POD_BRIDGE = "fabric0", "cbr0"
LAUNCH = Path(__file__).with_name("launch.py")
LAUNCHED: list[subprocess.Popen[bytes]] = []  # reaped by remove_everything


def node_address(index: int) -> str:
    return f"198.19.220.{10 + index}"


def node_subnet(index: int) -> str:
    return f"198.19.{220 + index}.0/24"


@dataclass
class Node:
    name: str
    index: int
    netns: str
    root: Path  # the node's filesystem: hostPath volumes live under it
    cgroup: Path
    init: subprocess.Popen[bytes] | None = None
    used_ips: set[str] = field(default_factory=set)

    @property
    def pidns(self) -> str:
        assert self.init is not None
        return f"/proc/{self.init.pid}/ns/pid_for_children"

    @property
    def gateway(self) -> str:
        return f"198.19.{220 + self.index}.1"

    def host_path(self, path: str) -> Path:
        """Where a hostPath of this node lives on the machine."""
        return self.root / path.lstrip("/")

    def next_ip(self) -> str:
        for host in range(10, 250):
            ip = f"198.19.{220 + self.index}.{host}"
            if ip not in self.used_ips:
                self.used_ips.add(ip)
                return ip
        raise RuntimeError(f"node {self.name}: no pod address left")


def launch(spec: dict[str, Any], where: Path, name: str, **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``launch.py`` with ``spec`` (written next to the logs for a post-mortem)."""
    path = where / f"{name}.launch.json"
    path.write_text(json.dumps(spec, indent=1))
    process = subprocess.Popen([sys.executable, str(LAUNCH), str(path)], **popen)
    LAUNCHED.append(process)
    return process


def make_control() -> None:
    labnet.ensure_namespace(CONTROL_NETNS)
    with IPRoute(netns=CONTROL_NETNS) as ipr:
        labnet._ensure_up(ipr, "lo")
        labnet._ensure_bridge(ipr, FABRIC_BRIDGE, API_ADDRESS)


def make_node(name: str, index: int, workdir: Path, cgroup_top: Path,
              all_indexes: list[int]) -> Node:
    node = Node(name=name, index=index, netns=f"{PREFIX}{name}",
                root=workdir / "nodes" / name, cgroup=cgroup_top / name)
    node.root.mkdir(parents=True)
    node.cgroup.mkdir()
    labnet.ensure_namespace(node.netns)
    nsenter.write_sysctls(node.netns, {"net/ipv4/ip_forward": "1"})
    port = f"v{name}"[:15]
    with IPRoute(netns=node.netns) as ipr:
        labnet._ensure_up(ipr, "lo")
        ipr.link("add", ifname="eth0", kind="veth",
                 peer={"ifname": port, "net_ns_fd": CONTROL_NETNS})
        labnet._ensure_address(ipr, "eth0", node_address(index))
        labnet._ensure_up(ipr, "eth0")
        labnet._ensure_bridge(ipr, POD_BRIDGE, node.gateway)
        for other in all_indexes:
            if other != index:
                labnet._ensure_route(ipr, node_subnet(other), node_address(other))
    with IPRoute(netns=CONTROL_NETNS) as ctl:
        labnet._ensure_port(ctl, port, FABRIC_BRIDGE)
        labnet._ensure_route(ctl, node_subnet(index), node_address(index))
    (node.cgroup / "init").mkdir()
    logs = workdir / "logs"
    node.init = launch({"cgroup": str(node.cgroup / "init"), "netns": f"/run/netns/{node.netns}",
                        "newPidns": True, "argv": ["sleep", "infinity"],
                        "env": {"PATH": "/usr/bin:/bin"}}, logs, f"{name}-init")
    return node


def cgroup_top(run: str) -> Path:
    top = Path(cgroup2_mount()) / f"{PREFIX}{run}"
    top.mkdir()
    return top


def kill_cgroup(path: Path) -> None:
    """SIGKILL everything in ``path`` and below (cgroup.kill), wait until it is empty,
    then remove the directories, deepest first."""
    if not path.exists():
        return
    (path / "cgroup.kill").write_text("1")
    below = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for directory in [*below, path]:
        _wait_empty(directory)
        directory.rmdir()


def _wait_empty(cgroup: Path) -> None:
    deadline = time.monotonic() + 10
    while "populated 1" in (cgroup / "cgroup.events").read_text():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{cgroup} still has processes after cgroup.kill")
        time.sleep(0.02)  # no event to wait on without inotify; bounded


def remove_everything(cgroup: Path | None) -> list[str]:
    """Tear down every process, namespace and cgroup the harness made; the errors."""
    errors = []
    if cgroup is not None:
        try:
            kill_cgroup(cgroup)
        except OSError as exc:
            errors.append(f"cgroup {cgroup}: {exc}")
    while LAUNCHED:
        process = LAUNCHED.pop()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    for name in labnet.lab_namespaces(PREFIX):
        try:
            labnet.delete_namespace(name)
        except OSError as exc:
            errors.append(f"netns {name}: {exc}")
    return errors


def in_netns(netns: str, *command: str, check: bool = True) -> str:
    done = subprocess.run(["ip", "netns", "exec", netns, *command], capture_output=True,
                          text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} in {netns}: {done.stderr.strip()}")
    return done.stdout


def readable_paths(root: Path) -> list[str]:
    """The code's directories and their ancestors: world-readable in the "image" (a
    private checkout in a 0700 home is not, and the CA runs as uid 65532)."""
    paths = {str(p) for p in [root, *root.parents] if str(p) != "/"}
    venv = Path(sys.prefix)
    paths |= {str(p) for p in [venv, *venv.parents] if str(p) != "/"}
    return sorted(paths, key=len)

