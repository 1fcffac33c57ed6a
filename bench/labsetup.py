"""The benchmark's place in the lab: four pods added to whatever lab is up (or to a
lab the bench brings up itself), and, for a redirect mode that lab does not run,
a second lab of the bench's own.

    bench/mesh-client  node-1  enrolled     trellis, trellis-ebpf scenarios
    bench/mesh-server  node-2  enrolled
    bench/plain-client node-1  not enrolled direct, envoy, stunnel scenarios
    bench/plain-server node-2  not enrolled

Mesh and plain pods sit on the same two nodes and the same veths, bridges and
uplinks, so the only difference between ``direct`` and ``trellis`` is the mesh.

A lab has one redirect mode for all its nodes, so ``trellis`` (iptables) and
``trellis-ebpf`` cannot share one. The lab named by the environment (the *main*
lab) serves the plain scenarios and the mesh scenario of its own mode; the other
mode gets a *side* lab made of bench/bench-pods.yaml alone, beside the main one
(``side_lab`` names its directory and namespace prefix). Labs never meet: every
address is inside their namespaces, and eBPF pins and pod cgroups are per prefix.

A lab the bench brought up is taken down again, side labs first. In a lab that
was already up the four pods stay (bench/bench-pods.yaml; ``trellis lab delete
-f`` removes them): the node proxy keeps pooled HBONE connections of a deleted
pod, whose sockets live on in the deleted namespace, so a pod deleted and
re-created with the same identity and address hangs on the stale pool.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from lab import changes, lifecycle, nsenter, redirect_mode, supervisor
from lab.errors import LabError
from lab.lifecycle import Out
from lab.plan import DEFAULT_PREFIX, LabPlan, PodPlan
from lab.processes import agent_name, proxy_name
from lab.state import ENV_DIR, ENV_PREFIX, LabDir, load_record, netns_prefix

NAMESPACE = "bench"
CLIENT_NODE, SERVER_NODE = "node-1", "node-2"
ENROLL_SECONDS = 30.0
OBJECTS = Path(__file__).resolve().parent / "bench-pods.yaml"


@dataclass(frozen=True)
class BenchLab:
    labdir: LabDir
    started_lab: bool  # the bench brought the lab up, so it takes it down
    redirect: str  # the lab's redirect mode (lab/redirect_mode.py)
    mesh_client: PodPlan
    mesh_server: PodPlan
    plain_client: PodPlan
    plain_server: PodPlan
    agent_pids: tuple[int, ...]  # both nodes' agents and proxies (mesh_pids)
    # Pod key → its cgroup v2 directory (eBPF mode only): a pod's programs see only
    # the sockets of processes in its cgroup, so the bench's clients must join it.
    cgroups: Mapping[str, str]

    def cgroup(self, pod: PodPlan) -> str:
        return self.cgroups.get(pod.key, "")


@dataclass(frozen=True)
class BenchLabs:
    main: BenchLab  # the lab named by the environment: direct, envoy, stunnel
    meshes: Mapping[str, BenchLab]  # redirect mode → the lab whose mesh runs in it


def side_lab(labdir: LabDir, prefix: str, mode: str) -> tuple[LabDir, str]:
    """The directory and namespace prefix of the bench's own lab for ``mode``, beside
    the main lab: ``/run/trellis-lab-X`` → ``/run/trellis-lab-X-ebpf``, ``tlab-X-`` →
    ``tlab-ebpf-X-``. The mode goes first in the prefix so that the side lab's
    namespaces do not start with the main prefix, which `lab down` sweeps by (only
    the default ``tlab-`` covers every lab)."""
    return (LabDir(labdir.root.with_name(f"{labdir.root.name}-{mode}")),
            f"{DEFAULT_PREFIX}{mode}-{prefix.removeprefix(DEFAULT_PREFIX)}")


@contextlib.contextmanager
def bench_labs(labdir: LabDir, modes: Collection[str], out: Out,
               keep: bool) -> Iterator[BenchLabs]:
    """The main lab, and a side lab for each mode in ``modes`` the main lab does not run;
    on leaving, each lab the bench brought up is taken down (unless ``keep``)."""
    record = load_record(labdir)
    if record is not None and not record.mesh:
        raise LabError("the lab is up without the mesh (--no-mesh); the trellis scenarios "
                       "need it: `trellis lab up` turns it on")
    # A main lab of our own runs the first mode asked for, so that a run of
    # trellis-ebpf alone needs no second lab.
    own_mode = "iptables" if "iptables" in modes or not modes else "ebpf"
    with contextlib.ExitStack() as stack:  # leaves in reverse: side labs go down first
        main = stack.enter_context(_lab(labdir, out, keep, own_mode, side=False))
        meshes = {main.redirect: main}
        for mode in (m for m in redirect_mode.MODES if m in modes and m != main.redirect):
            side_dir, side_prefix = side_lab(labdir, lab_prefix(labdir), mode)
            meshes[mode] = stack.enter_context(
                _lab(side_dir, out, keep, mode, side=True, prefix=side_prefix))
        yield BenchLabs(main, meshes)


def lab_prefix(labdir: LabDir) -> str:
    record = load_record(labdir)
    return record.plan.prefix if record else netns_prefix()


@contextlib.contextmanager
def _lab(labdir: LabDir, out: Out, keep: bool, mode: str, side: bool,
         prefix: str | None = None) -> Iterator[BenchLab]:
    """One lab with the bench pods in it: brought up in ``mode`` when none is up."""
    started = load_record(labdir) is None
    try:
        if started:
            out(f"bringing up a lab in {mode} mode ({labdir.root}) ...")
            # A side lab is the bench pods alone: nothing else to start or to wait for.
            description = lifecycle.read_description(str(OBJECTS) if side else None)
            lifecycle.up(labdir, description, lifecycle.MESH, out, redirect=mode,
                         prefix=prefix)
        yield _enter(labdir, started, out)
    finally:
        _release(labdir, started, keep, side, out)


def _enter(labdir: LabDir, started: bool, out: Out) -> BenchLab:
    changes.apply(labdir, str(OBJECTS), out)  # a no-op once they are in
    record = load_record(labdir)
    assert record is not None
    plan = record.plan

    def pod(name: str) -> PodPlan:
        return plan.find_pods(f"{NAMESPACE}/{name}")[0]

    lab = BenchLab(labdir, started, redirect_mode.read_mode(labdir), pod("mesh-client"),
                   pod("mesh-server"), pod("plain-client"), pod("plain-server"),
                   mesh_pids(labdir, plan), redirect_mode.cgroups_for(labdir, plan))
    _wait_enrolled(lab)
    return lab


def mesh_pids(labdir: LabDir, plan: LabPlan) -> tuple[int, ...]:
    """The processes whose CPU and RSS are the data path's, on both bench nodes: each
    node's proxy (or, in a lab whose agent runs the proxy itself, the agent). The
    split agent is control plane, like istio-cni beside ztunnel; the Envoy and
    stunnel scenarios count only their proxies too."""
    pids: list[int] = []
    for node in (plan.node(CLIENT_NODE), plan.node(SERVER_NODE)):
        pid = (supervisor.running_pid(labdir, proxy_name(node))
               or supervisor.running_pid(labdir, agent_name(node)))
        if pid is None:
            raise LabError(f"the proxy of {node.name} in {labdir.root} is not running; "
                           "`trellis lab up` restarts it")
        pids.append(pid)
    return tuple(pids)


def _wait_enrolled(lab: BenchLab) -> None:
    """The agents poll workloads.yaml: wait for their listeners in the two mesh pods."""
    deadline = time.monotonic() + ENROLL_SECONDS
    while not (nsenter.port_in_use(lab.mesh_client.netns, 15001)
               and nsenter.port_in_use(lab.mesh_server.netns, 15008)):
        if time.monotonic() > deadline:
            raise LabError(f"the bench pods were not enrolled within {ENROLL_SECONDS:.0f} s "
                           f"(no proxy listener in {lab.mesh_client.netns}); see the agents' "
                           f"logs in {lab.labdir.logs}")
        time.sleep(0.2)


def _release(labdir: LabDir, started: bool, keep: bool, side: bool, out: Out) -> None:
    if started and not keep:
        lifecycle.down(labdir, out)
    elif side:
        out(f"the bench's {redirect_mode.read_mode(labdir)} lab stays up; "
            f"`{ENV_DIR}={labdir.root} {ENV_PREFIX}={lab_prefix(labdir)} "
            "trellis lab down` removes it")
    else:
        out(f"the bench pods stay in the lab; `trellis lab delete -f {OBJECTS}` removes them")
