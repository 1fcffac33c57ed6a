"""`lab apply -f` and `lab delete -f`: change a running lab, object by object.

Objects are matched by (kind, namespace, name), as kubectl does. A Pod gets or
loses its namespace, veth, address and app; a Namespace or Service, and any
other kind (an AuthorizationPolicy …), only changes workloads.yaml, which the
node agents poll. Pods that did not change keep their address and their app.

An AuthorizationPolicy with errors is refused whole, with the policy
loader's errors (each naming the policy and the field), and nothing changes:
what admission does on a cluster. (A node agent that is handed an invalid
policy anyway keeps its last valid version or fails closed; see
``policy/failclosed.py``.)

The order matters to the agents: a new pod's namespace and app exist before
workloads.yaml names it, and a deleted pod leaves workloads.yaml before its
namespace goes, so an agent never enrolls a namespace that is not there yet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lab import network, redirect_mode, supervisor
from lab.errors import LabError, LabNotUp
from lab.lifecycle import Out, read_documents, reported_as, start_and_wait, write_workloads
from lab.plan import LabPlan, PodPlan, plan_lab
from lab.processes import app_name, app_process
from lab.spec import Key, LabSpec, build_spec, describe, merge, object_key, remove
from lab.state import LabDir, LabRecord, load_record, locked, save_record
from policy import Document, load_policies


class PolicyRefused(LabError):
    """An invalid AuthorizationPolicy in `lab apply`: the first error, then the rest."""

    def __init__(self, message: str, details: tuple[str, ...]) -> None:
        super().__init__(message)
        self.details = details


def apply(labdir: LabDir, path: str, out: Out) -> None:
    documents = _read(path)
    _refuse_invalid_policies(documents, path)
    with locked(labdir):
        record = require_record(labdir)
        spec = build_spec(merge(record.documents, documents, path), path)
        _check_nodes(spec, record.plan, path)
        plan = _commit(labdir, record, spec)
    old = {_key(d): d for d in record.documents}
    for number, doc in enumerate(documents, start=1):
        key = object_key(doc, path, number)
        verb = ("created" if key not in old
                else "unchanged" if old[key] == doc else "configured")
        out(f"{describe(key)}: {verb}{_placement(plan, key)}")


def delete(labdir: LabDir, path: str, out: Out) -> None:
    documents = _read(path)
    keys = [object_key(doc, path, number) for number, doc in enumerate(documents, start=1)]
    with locked(labdir):
        record = require_record(labdir)
        kept, missing = remove(record.documents, keys)
        spec = build_spec(kept, path)
        _commit(labdir, record, spec)
    left = {_key(d) for d in kept}
    for key in (_key(d) for d in record.documents):
        if key not in left:
            out(f"{describe(key)}: deleted")
    for key in missing:
        out(f"{describe(key)}: not found (nothing to delete)")


def _refuse_invalid_policies(documents: Sequence[Mapping[str, Any]], path: str) -> None:
    loaded = load_policies([Document(doc, f"{path} document {number}")
                            for number, doc in enumerate(documents, start=1)])
    if loaded.errors:
        first, *rest = (str(problem) for problem in loaded.errors)
        raise PolicyRefused(f"{path}: {first} (refused: nothing was applied)", tuple(rest))


def require_record(labdir: LabDir) -> LabRecord:
    record = load_record(labdir)
    if record is None:
        raise LabNotUp(f"no lab is up (no {labdir.record}); start one with `trellis lab up`")
    return record


def _commit(labdir: LabDir, record: LabRecord, spec: LabSpec) -> LabPlan:
    old_plan = record.plan
    plan = plan_lab(spec, old_plan.prefix, previous=old_plan)
    old = {p.key: p for p in old_plan.pods}
    new = {p.key: p for p in plan.pods}
    gone = [p for k, p in old.items() if k not in new or _moved(p, new[k])]
    added = [p for k, p in new.items() if k not in old or _moved(old[k], p)]
    # The record first: if this stops half-way, `lab up` finishes it, `lab down` removes it.
    save_record(labdir, LabRecord(plan, spec.documents, record.source, record.source_digest,
                                  record.mesh))
    for pod in gone:
        if pod.key in new:  # moved to another node: its namespace name is about to be reused
            with reported_as(f"Pod {pod.key}"):
                _remove_pod(labdir, old_plan, pod)
    for pod in added:
        with reported_as(f"Pod {pod.key}"):
            network.ensure_pod(plan, pod)
    cgroups = redirect_mode.cgroups_for(labdir, plan)
    start_and_wait(labdir, [app_process(plan, pod, cgroup=cgroups.get(pod.key, ""))
                            for pod in added])
    with reported_as("workloads"):
        write_workloads(labdir, spec, plan)
    for pod in gone:
        if pod.key not in new:
            with reported_as(f"Pod {pod.key}"):
                _remove_pod(labdir, old_plan, pod)
    return plan


def _remove_pod(labdir: LabDir, plan: LabPlan, pod: PodPlan) -> None:
    supervisor.stop(labdir, [app_name(plan, pod)])
    supervisor.terminate(supervisor.processes_in([pod.netns]))
    network.remove_pod(plan, pod)


def _moved(old: PodPlan, new: PodPlan) -> bool:
    return (old.node, old.netns, old.ip) != (new.node, new.netns, new.ip)


def _check_nodes(spec: LabSpec, plan: LabPlan, source: str) -> None:
    """Nodes are made by `lab up` (each needs its agent, token and routes on every other)."""
    nodes = {n.name for n in plan.nodes}
    for pod in spec.pods:
        if pod.node not in nodes:
            raise LabError(f"{source}: Pod {pod.key}: spec.nodeName: {pod.node!r} is not a "
                           f"node of this lab (nodes: {', '.join(sorted(nodes))}); "
                           "nodes are made by `trellis lab up`")


def _placement(plan: LabPlan, key: Key) -> str:
    kind, namespace, name = key
    ref = f"{namespace}/{name}"
    if kind == "Pod":
        pod = next(p for p in plan.pods if p.key == ref)
        return f" ({pod.ip} on {pod.node})"
    if kind == "Service":
        svc = next(s for s in plan.services if s.key == ref)
        return f" (VIP {svc.vip})"
    return ""


def _key(doc: Mapping[str, Any]) -> Key:
    return object_key(doc, "lab state", 0)


def _read(path: str) -> Sequence[dict[str, Any]]:
    documents = read_documents(path)
    if not documents:
        raise LabError(f"{path}: no documents")
    return documents
