"""`lab up` and `lab down`: bring the whole lab to its state, or remove all of it.

``up`` is a list of idempotent steps, each printed as one line (``[3/9] node-2:
network ready``). Every step looks before it acts, so a second ``up`` only checks
health and says so, and an ``up`` after a crash finishes the job. The record
(lab.json) is written before the first namespace exists, so ``down`` always
knows what to remove; ``down`` also sweeps by namespace prefix and pid files, for
a lab whose record was lost.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from lab import network, redirect_mode, supervisor
from lab.errors import LabError, LabFailure
from lab.plan import CA_PORT, CONTROL_ADDRESS, FABRIC_BRIDGE, LabPlan, NodePlan, plan_lab
from lab.processes import (
    AGENT_PREFIX,
    CA_NAME,
    PROXY_PREFIX,
    ProcessSpec,
    agent_name,
    agent_process,
    app_processes,
    ca_process,
    cert_ttl_file,
    check_cert_ttl,
    choose_cert_ttl,
    proxy_name,
    proxy_process,
)
from lab.render import dump_workloads, render_workloads
from lab.spec import LabSpec, build_spec, load_documents
from lab.state import (
    ENV_PREFIX,
    LabDir,
    LabRecord,
    digest_documents,
    load_record,
    locked,
    netns_prefix,
    save_record,
    write_atomic,
)

# Where a command writes its progress lines (print, or a test's list.append);
# the one definition, which bench imports too.
Out = Callable[[str], None]
DEFAULT_SOURCE = "default lab"


@dataclass(frozen=True)
class Description:
    source: str  # the file as the user named it, for error lines
    documents: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Mesh:
    """How the lab runs the mesh; tests substitute their own processes."""

    ca: Callable[[LabPlan, LabDir], ProcessSpec]
    agent: Callable[[LabPlan, NodePlan, LabDir], ProcessSpec]
    issue_tokens: Callable[[Sequence[str], Path, Path], object]
    # The node proxy as a process of its own, started before the agent; None: the
    # agent runs the proxy itself (tests that substitute a one-process agent).
    proxy: Callable[[LabPlan, NodePlan, LabDir], ProcessSpec] | None = None


def _issue_node_tokens(nodes: Sequence[str], tokens_dir: Path, digest_file: Path) -> object:
    try:
        from identity.node_auth import issue_node_tokens
    except ImportError as exc:
        raise LabFailure(f"ca: cannot issue node tokens ({exc}); `trellis lab up --no-mesh` "
                         "brings up the network and apps alone") from None
    return issue_node_tokens(list(nodes), tokens_dir, digest_file)


MESH = Mesh(ca=ca_process, agent=agent_process, issue_tokens=_issue_node_tokens,
            proxy=proxy_process)


def read_description(path: str | None) -> Description:
    """The lab description from ``path`` (or the default lab), fully checked."""
    if path is None:
        text = importlib.resources.files("lab").joinpath("default-lab.yaml").read_text()
        documents = load_documents(text, DEFAULT_SOURCE)
    else:
        documents = read_documents(path)
    source = path or DEFAULT_SOURCE
    build_spec(documents, source)  # every error surfaces here, before anything is made
    return Description(source, tuple(documents))


def read_documents(path: str) -> list[dict[str, Any]]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise LabError(f"{path}: {exc.strerror}") from None
    return load_documents(text, path)


def up(labdir: LabDir, description: Description, mesh: Mesh | None, out: Out,
       redirect: str | None = None, prefix: str | None = None,
       cert_ttl: str | None = None) -> None:
    """Make the lab described (with the mesh unless ``mesh`` is None), or finish making it.
    ``redirect`` picks the mode (lab/redirect_mode.py); None keeps the lab's. ``prefix``
    names a new lab's namespaces (None: $TRELLIS_LAB_NETNS_PREFIX); a lab that is up
    keeps its own. ``cert_ttl`` is the CA's workload certificate lifetime (``90s``);
    None keeps the lab's (the CA's default, 24 h, for a new lab)."""
    if cert_ttl is not None:
        check_cert_ttl(cert_ttl)  # a mistake is refused before the lab directory exists
    with locked(labdir, create=True):
        is_up = load_record(labdir) is not None
        redirect_mode.choose_mode(labdir, redirect, is_up)
        choose_cert_ttl(labdir, cert_ttl, is_up)
        record = _record_for(labdir, description, mesh is not None, prefix)
        save_record(labdir, record)
        spec = build_spec(record.documents, record.source)
        steps = _steps(labdir, record.plan, spec, mesh)
        changed = False
        for number, (label, step) in enumerate(steps, start=1):
            with reported_as(label):
                text, did = step()
            changed |= did
            out(f"[{number}/{len(steps)}] {text}")
    plan = record.plan
    summary = (f"{len(plan.nodes)} nodes, {len(plan.pods)} pods, {len(plan.services)} "
               f"services, mesh {'on' if mesh else 'off'}")
    out(f"lab is up: {summary}" if changed else f"lab is already up and healthy: {summary}")


def down(labdir: LabDir, out: Out) -> None:
    """Remove every namespace, process and file the lab made; harmless when nothing is up."""
    with locked(labdir):
        record = _load_record_leniently(labdir)
        prefix = record.plan.prefix if record else netns_prefix()
        names = supervisor.pid_file_names(labdir)
        # Agents first, then proxies, while pods still exist.
        agents = [n for n in names if n.startswith(AGENT_PREFIX)]
        proxies = [n for n in names if n.startswith(PROXY_PREFIX)]
        stopped = supervisor.stop(labdir, agents)
        stopped += supervisor.stop(labdir, proxies)
        stopped += supervisor.stop(labdir, [n for n in names
                                            if n not in agents and n not in proxies])
        namespaces = network.lab_namespaces(prefix)
        strays = supervisor.processes_in(namespaces)
        supervisor.terminate(strays)
        for name in namespaces:
            network.delete_namespace(name)
        cleaned = redirect_mode.remove(labdir, prefix)  # eBPF pins and pod cgroups
        with contextlib.suppress(FileNotFoundError):
            cert_ttl_file(labdir).unlink()
        files = _remove_files(labdir) + cleaned
    with contextlib.suppress(OSError):  # left in place if it holds files not ours
        labdir.root.rmdir()
    if not (stopped or strays or namespaces or files):
        out("nothing to remove: no lab is up")
        return
    out(f"lab is down: stopped {stopped + len(strays)} processes, removed "
        f"{len(namespaces)} network namespaces and the lab's files in {labdir.root}")


@contextlib.contextmanager
def reported_as(label: str) -> Iterator[None]:
    """A kernel or file error becomes one failure line naming what the lab was doing."""
    try:
        yield
    except (NetlinkError, OSError) as exc:
        raise LabFailure(f"{label}: {exc}") from exc


def write_workloads(labdir: LabDir, spec: LabSpec, plan: LabPlan) -> bool:
    """Rewrite workloads.yaml if its content changes; agents poll it, so only then."""
    text = dump_workloads(render_workloads(spec, plan, redirect_mode.cgroups_for(labdir, plan)))
    with contextlib.suppress(FileNotFoundError):
        if labdir.workloads.read_text() == text:
            return False
    write_atomic(labdir.workloads, text)
    return True


def start_and_wait(labdir: LabDir, specs: Sequence[ProcessSpec]) -> int:
    """Start those not running (their ports checked free first), wait for all; count started."""
    missing = [s for s in specs if supervisor.running_pid(labdir, s.name) is None]
    for spec in missing:
        supervisor.ensure_ports_free(spec.ports)
    for spec in missing:
        supervisor.spawn(labdir, spec)
    supervisor.wait_ready(labdir, specs)
    return len(missing)


def _record_for(labdir: LabDir, description: Description, mesh: bool,
                prefix: str | None = None) -> LabRecord:
    digest = digest_documents(description.documents)
    record = load_record(labdir)
    if record is None:
        spec = build_spec(description.documents, description.source)
        # A given prefix is checked as the environment's is (it must start with "tlab-").
        plan = plan_lab(spec, netns_prefix({ENV_PREFIX: prefix}) if prefix else netns_prefix())
        return LabRecord(plan, description.documents, description.source, digest, mesh)
    if record.source_digest != digest:
        raise LabError(f"a different lab is up (from {record.source}); change it with "
                       "`trellis lab apply -f FILE`, or run `trellis lab down` first")
    # Keep what `apply`/`delete` changed since: this lab, as it is now.
    return LabRecord(record.plan, record.documents, record.source, digest, mesh)


def _steps(labdir: LabDir, plan: LabPlan, spec: LabSpec,
           mesh: Mesh | None) -> list[tuple[str, Callable[[], tuple[str, bool]]]]:
    def control() -> tuple[str, bool]:
        return (f"control: {plan.control_netns}, {FABRIC_BRIDGE} {CONTROL_ADDRESS}/24",
                network.ensure_control(plan))

    def node_step(node: NodePlan) -> Callable[[], tuple[str, bool]]:
        return lambda: (f"{node.name}: network ready ({node.netns}, uplink {node.uplink} "
                        f"{node.address}, pods {node.pod_subnet})",
                        network.ensure_node(plan, node))

    def pods() -> tuple[str, bool]:
        changed = [network.ensure_pod(plan, pod) for pod in plan.pods]
        return f"pods: {len(plan.pods)} wired to their nodes", any(changed)

    def apps() -> tuple[str, bool]:
        started = start_and_wait(labdir, app_processes(
            plan, redirect_mode.cgroups_for(labdir, plan)))
        return f"apps: {len(plan.pods)} answering on :8080", started > 0

    def workloads() -> tuple[str, bool]:
        return f"workloads: {labdir.workloads}", write_workloads(labdir, spec, plan)

    steps = [("control", control),
             *((n.name, node_step(n)) for n in plan.nodes),
             ("pods", pods), ("apps", apps), ("workloads", workloads)]
    if mesh is None:
        steps.append(("mesh", lambda: _mesh_off(labdir, plan)))
        return steps

    def ca() -> tuple[str, bool]:
        # Tokens are credentials: the directory is the lab's, readable by root alone.
        labdir.tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Idempotent by contract: existing tokens are kept, so running agents stay valid.
        mesh.issue_tokens([n.name for n in plan.nodes], labdir.tokens, labdir.digests)
        started = start_and_wait(labdir, [mesh.ca(plan, labdir)])
        return f"ca: ready at https://{CONTROL_ADDRESS}:{CA_PORT}", started > 0

    def agent_step(node: NodePlan) -> Callable[[], tuple[str, bool]]:
        def step() -> tuple[str, bool]:
            # The proxy first: the agent hands it pods as soon as it runs.
            started = 0
            if mesh.proxy is not None:
                started += start_and_wait(labdir, [mesh.proxy(plan, node, labdir)])
            started += start_and_wait(labdir, [mesh.agent(plan, node, labdir)])
            what = "proxy and agent" if mesh.proxy is not None else "agent"
            return f"{node.name}: {what} ready", started > 0
        return step

    steps.append(("ca", ca))
    steps.extend((f"{n.name} agent", agent_step(n)) for n in plan.nodes)
    return steps


def _mesh_off(labdir: LabDir, plan: LabPlan) -> tuple[str, bool]:
    names = ([agent_name(n) for n in plan.nodes] + [proxy_name(n) for n in plan.nodes]
             + [CA_NAME])
    stopped = supervisor.stop(labdir, names)
    return ("mesh: off (--no-mesh)" + (f", stopped {stopped} processes" if stopped else ""),
            stopped > 0)


def _load_record_leniently(labdir: LabDir) -> LabRecord | None:
    """`down` must work even when the record is damaged: it falls back to the prefix."""
    try:
        return load_record(labdir)
    except LabError:
        return None


def _remove_files(labdir: LabDir) -> int:
    removed = 0
    for path in labdir.entries():
        if path.is_dir():
            shutil.rmtree(path)
            removed += 1
        elif path.exists():
            path.unlink()
            removed += 1
    return removed
