"""The benchmark's place in the lab: four pods added to whatever lab is up (or to a
lab the bench brings up itself), and removed again afterwards.

    bench/mesh-client  node-1  enrolled     trellis scenario
    bench/mesh-server  node-2  enrolled
    bench/plain-client node-1  not enrolled direct, envoy, stunnel scenarios
    bench/plain-server node-2  not enrolled

Mesh and plain pods sit on the same two nodes and the same veths, bridges and
uplinks, so the only difference between ``direct`` and ``trellis`` is the mesh.
A lab the bench brought up is taken down again. In a lab that was already up
the four pods stay (bench/bench-pods.yaml; ``trellis lab delete -f`` removes
them): the node proxy keeps pooled HBONE connections of a deleted pod, whose
sockets live on in the deleted namespace, so a pod deleted and re-created with
the same identity and address hangs on the stale pool (a tunnel bug, reported;
not the bench's to work around by renaming identities).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab import changes, lifecycle, nsenter, supervisor
from lab.errors import LabError
from lab.plan import PodPlan
from lab.processes import agent_name
from lab.state import LabDir, load_record

Out = Callable[[str], None]
NAMESPACE = "bench"
CLIENT_NODE, SERVER_NODE = "node-1", "node-2"
ENROLL_SECONDS = 30.0
OBJECTS = Path(__file__).resolve().parent / "bench-pods.yaml"


@dataclass(frozen=True)
class BenchLab:
    labdir: LabDir
    started_lab: bool  # the bench brought the lab up, so it takes it down
    mesh_client: PodPlan
    mesh_server: PodPlan
    plain_client: PodPlan
    plain_server: PodPlan
    agent_pids: tuple[int, ...]  # the Trellis node proxies of both nodes


def prepare(labdir: LabDir, out: Out) -> BenchLab:
    record = load_record(labdir)
    started = record is None
    if record is None:
        out(f"bringing the lab up ({labdir.root}) ...")
        lifecycle.up(labdir, lifecycle.read_description(None), lifecycle.MESH, out)
    elif not record.mesh:
        raise LabError("the lab is up without the mesh (--no-mesh); the trellis scenario "
                       "needs it: `trellis lab up` turns it on")
    changes.apply(labdir, str(OBJECTS), out)
    record = load_record(labdir)
    assert record is not None
    plan = record.plan

    def pod(name: str) -> PodPlan:
        return plan.find_pods(f"{NAMESPACE}/{name}")[0]

    pids = tuple(supervisor.running_pid(labdir, agent_name(plan.node(n)))
                 for n in (CLIENT_NODE, SERVER_NODE))
    if any(p is None for p in pids):
        raise LabError("a node agent of the lab is not running; `trellis lab up` restarts it")
    lab = BenchLab(labdir, started, pod("mesh-client"), pod("mesh-server"),
                   pod("plain-client"), pod("plain-server"),
                   tuple(p for p in pids if p is not None))
    _wait_enrolled(lab)
    return lab


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


def release(lab: BenchLab, out: Out, keep: bool) -> None:
    if keep or not lab.started_lab:
        out(f"the bench pods stay in the lab; `trellis lab delete -f {OBJECTS}` removes them")
        return
    lifecycle.down(lab.labdir, out)
