"""The processes the lab runs, as data: what to start, where, and how to tell it is ready.

Keeping the list as data (not as code that starts things) is what lets the lab
bring up only the network and the apps (``--no-mesh``), lets tests swap in their
own commands, and keeps the command lines the CA and the node agent must accept
in one place:

    trellis ca serve --state-dir DIR/ca --listen 198.18.0.1:15012
        --workloads DIR/workloads.yaml --node-tokens DIR/tokens/digests.json
        [--cert-lifetime TTL]   (from `lab up --cert-ttl TTL`, kept in DIR/cert-ttl)
    trellis proxy run --node NODE --workloads DIR/workloads.yaml
        --ca-url https://198.18.0.1:15012 --ca-root DIR/ca/root-cert.pem
        --token-file DIR/tokens/NODE.token --control-socket DIR/sockets/NODE.sock
    trellis agent run --node NODE --workloads DIR/workloads.yaml
        --control-socket DIR/sockets/NODE.sock --metrics 127.0.0.1:15014
        --readiness 127.0.0.1:15015 [--redirect ebpf ...]
    python -m lab.app --name POD --port 8080

A node runs two mesh processes, as an ambient node does (istio-cni and
ztunnel): the proxy, which binds the pods' listeners and carries their traffic,
and the agent, which enrolls pods and hands their namespaces to the proxy. Either
can be killed and restarted alone; pods keep working while the agent is down.

Each runs as ``ip netns exec <namespace> <python> -m …``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from lab.errors import LabError
from lab.plan import APP_PORT, CA_PORT, CONTROL_ADDRESS, LabPlan, NodePlan, PodPlan
from lab.redirect_mode import agent_arguments
from lab.state import LabDir

METRICS_PORT = 15020  # the proxy's, as ztunnel's
READINESS_PORT = 15021
AGENT_METRICS_PORT = 15014  # the agent's own, as istio-cni's monitoring port
AGENT_READINESS_PORT = 15015
# Ports the node's proxy binds inside every enrolled pod (ARCHITECTURE.md, "Ports").
IN_POD_PORTS = ((15001, "outbound capture"), (15006, "inbound plaintext"),
                (15008, "HBONE inbound"))
# The CA's serving certificate always names this host, whatever address is dialled
# (identity.ca.CA_SERVER_DNS_NAME).
CA_SERVER_NAME = "trellis-ca"

CA_NAME = "ca"
AGENT_PREFIX = "agent-"
PROXY_PREFIX = "proxy-"

# Workload certificate lifetimes `lab up --cert-ttl` accepts: the CA's own range
# (identity/ca_server.py: 1 minute to 90 days), in the CA's duration syntax.
CERT_TTL_SECONDS = (60, 90 * 24 * 3600)
_DURATION = re.compile(r"^([1-9][0-9]{0,7})([smh])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}

APP_READY_SECONDS = 10.0
CA_READY_SECONDS = 30.0
AGENT_READY_SECONDS = 30.0
PROXY_READY_SECONDS = 30.0


@dataclass(frozen=True)
class Probe:
    """Ready when a GET of ``path`` answers 200 (a bare TCP connect when ``path`` is empty)."""

    netns: str
    host: str
    port: int
    path: str = ""
    cafile: str | None = None  # HTTPS, verified against this root, when set
    server_name: str = ""


@dataclass(frozen=True)
class Port:
    """A port the process will bind; checked free first so a clash is one clear line."""

    owner: str  # the object, as errors name it: "Pod demo/x", "Node node-1", "CA"
    netns: str
    port: int
    what: str


@dataclass(frozen=True)
class ProcessSpec:
    name: str  # names logs/<name>.log and pids/<name>.pid
    label: str  # names it in progress lines and errors
    netns: str
    argv: tuple[str, ...]  # run as `ip netns exec <netns> <argv…>`
    ready: Probe
    ready_seconds: float
    ports: tuple[Port, ...] = ()
    cgroup: str = ""  # eBPF mode: the pod's cgroup v2 directory, joined before exec
    # eBPF mode's agent: enter the namespace with nsenter, not `ip netns exec`, whose
    # fresh /sys would hide bpffs and cgroup v2 (under /sys/fs) from the agent.
    host_mounts: bool = False


def app_process(plan: LabPlan, pod: PodPlan, python: str = sys.executable,
                cgroup: str = "") -> ProcessSpec:
    return ProcessSpec(
        name=app_name(plan, pod),
        label=f"Pod {pod.key}: app",
        netns=pod.netns,
        argv=(python, "-m", "lab.app", "--name", pod.name, "--port", str(APP_PORT)),
        # 127.0.0.1: never redirected by the mesh's rules, so this tests the app alone.
        ready=Probe(pod.netns, "127.0.0.1", APP_PORT, "/ready"),
        ready_seconds=APP_READY_SECONDS,
        ports=(Port(f"Pod {pod.key}", pod.netns, APP_PORT, "app"),),
        cgroup=cgroup,
    )


def ca_process(plan: LabPlan, labdir: LabDir, python: str = sys.executable) -> ProcessSpec:
    ttl = read_cert_ttl(labdir)
    return ProcessSpec(
        name=CA_NAME,
        label="ca",
        netns=plan.control_netns,
        argv=(python, "-m", "trellis", "ca", "serve",
              "--state-dir", str(labdir.ca),
              "--listen", f"{CONTROL_ADDRESS}:{CA_PORT}",
              "--workloads", str(labdir.workloads),
              "--node-tokens", str(labdir.digests),
              *(("--cert-lifetime", ttl) if ttl else ())),
        ready=Probe(plan.control_netns, CONTROL_ADDRESS, CA_PORT, "/healthz",
                    cafile=str(labdir.ca_root), server_name=CA_SERVER_NAME),
        ready_seconds=CA_READY_SECONDS,
        ports=(Port("CA", plan.control_netns, CA_PORT, "CA API"),),
    )


def proxy_process(plan: LabPlan, node: NodePlan, labdir: LabDir,
                  python: str = sys.executable) -> ProcessSpec:
    pod_ports = tuple(Port(f"Pod {pod.key}", pod.netns, port, what)
                      for pod in plan.pods_on(node.name) if pod.enrolled
                      for port, what in IN_POD_PORTS)
    return ProcessSpec(
        name=proxy_name(node),
        label=f"{node.name}: proxy",
        netns=node.netns,
        argv=(python, "-m", "trellis", "proxy", "run",
              "--node", node.name,
              "--workloads", str(labdir.workloads),
              "--ca-url", f"https://{CONTROL_ADDRESS}:{CA_PORT}",
              "--ca-root", str(labdir.ca_root),
              "--token-file", str(labdir.token(node.name)),
              "--control-socket", str(labdir.control_socket(node.name))),
        ready=Probe(node.netns, "127.0.0.1", READINESS_PORT, "/healthz/ready"),
        ready_seconds=PROXY_READY_SECONDS,
        ports=(Port(f"Node {node.name}", node.netns, METRICS_PORT, "proxy metrics"),
               Port(f"Node {node.name}", node.netns, READINESS_PORT, "proxy readiness"),
               *pod_ports),
    )


def agent_process(plan: LabPlan, node: NodePlan, labdir: LabDir,
                  python: str = sys.executable) -> ProcessSpec:
    redirect = agent_arguments(labdir, plan, node.name)
    return ProcessSpec(
        name=agent_name(node),
        label=f"{node.name}: agent",
        netns=node.netns,
        argv=(python, "-m", "trellis", "agent", "run",
              "--node", node.name,
              "--workloads", str(labdir.workloads),
              "--control-socket", str(labdir.control_socket(node.name)),
              "--metrics", f"127.0.0.1:{AGENT_METRICS_PORT}",
              "--readiness", f"127.0.0.1:{AGENT_READINESS_PORT}",
              *redirect),
        host_mounts=bool(redirect),
        ready=Probe(node.netns, "127.0.0.1", AGENT_READINESS_PORT, "/healthz/ready"),
        ready_seconds=AGENT_READY_SECONDS,
        ports=(Port(f"Node {node.name}", node.netns, AGENT_METRICS_PORT, "agent metrics"),
               Port(f"Node {node.name}", node.netns, AGENT_READINESS_PORT,
                    "agent readiness")),
    )


def app_name(plan: LabPlan, pod: PodPlan) -> str:
    # From the namespace name, which is unique even when two pods share a name.
    return "app-" + pod.netns.removeprefix(plan.prefix)


def agent_name(node: NodePlan) -> str:
    return f"{AGENT_PREFIX}{node.name}"


def proxy_name(node: NodePlan) -> str:
    return f"{PROXY_PREFIX}{node.name}"


def app_processes(plan: LabPlan,
                  cgroups: Mapping[str, str] = MappingProxyType({})) -> tuple[ProcessSpec, ...]:
    return tuple(app_process(plan, pod, cgroup=cgroups.get(pod.key, "")) for pod in plan.pods)



# The workload certificate lifetime is chosen at `lab up --cert-ttl` and kept in the
# lab's directory, so a later `lab up` (say, after the CA crashed) restarts the CA
# with the same lifetime.

def cert_ttl_file(labdir: LabDir) -> Path:
    return labdir.root / "cert-ttl"


def check_cert_ttl(value: str) -> str:
    """``value`` if it is a lifetime the CA accepts (``90s``, ``10m``, ``24h``), else a
    LabError naming the option."""
    match = _DURATION.fullmatch(value)
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]] if match else 0
    low, high = CERT_TTL_SECONDS
    if not low <= seconds <= high:
        raise LabError(f"--cert-ttl: {value!r} must be a duration like 90s, 10m or 24h, "
                       "from 1 minute to 90 days")
    return value


def read_cert_ttl(labdir: LabDir) -> str | None:
    """The lab's chosen lifetime, or None for the CA's default (24 h)."""
    try:
        return check_cert_ttl(cert_ttl_file(labdir).read_text().strip())
    except (FileNotFoundError, LabError):
        return None


def choose_cert_ttl(labdir: LabDir, requested: str | None, lab_is_up: bool) -> str | None:
    """The lifetime for this ``lab up``: the one asked for, else the lab's own. A lab that
    is up keeps its CA, so a different lifetime needs ``lab down`` first."""
    current = read_cert_ttl(labdir)
    if requested is None:
        return current
    check_cert_ttl(requested)
    if lab_is_up and requested != current:
        raise LabError(f"the lab is up with --cert-ttl {current or '24h (default)'}; run "
                       f"`trellis lab down` before `trellis lab up --cert-ttl {requested}`")
    labdir.root.mkdir(parents=True, exist_ok=True)
    cert_ttl_file(labdir).write_text(requested + "\n")
    return requested
