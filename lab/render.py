"""What the lab writes for the agents and shows to people: pure functions of the plan.

``workloads.yaml`` is the mesh's view of the lab, in Kubernetes shape so the node
agent's file source and a future Kubernetes source read the same fields: each Pod
gets ``status.podIP``, ``spec.nodeName``, ``spec.serviceAccountName`` and the
annotation ``trellis.dev/netns``; each Service gets ``spec.clusterIP``; every
other document (Namespaces, AuthorizationPolicies …) passes through unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import yaml

from lab.plan import NETNS_DIR, LabPlan
from lab.spec import LabSpec, object_key

NETNS_ANNOTATION = "trellis.dev/netns"
CGROUP_ANNOTATION = "trellis.dev/cgroup"
_KIND_ORDER = {"Namespace": 0, "Pod": 1, "Service": 2}

WORKLOADS_HEADER = (
    "# Written by `trellis lab`; node agents read it. Edits here are overwritten:\n"
    "# change the lab with `trellis lab apply -f FILE` / `trellis lab delete -f FILE`.\n"
)


def render_workloads(spec: LabSpec, plan: LabPlan,
                     cgroups: Mapping[str, str] = MappingProxyType({})) -> list[dict[str, Any]]:
    """Every document of the lab, with what the lab assigned filled in (and, in eBPF
    mode, each pod's cgroup from ``cgroups``, by pod key)."""
    pods = {p.key: p for p in plan.pods}
    services = {s.key: s for s in plan.services}
    rendered = []
    for number, doc in enumerate(spec.documents, start=1):
        kind, namespace, name = object_key(doc, "lab state", number)
        out = copy.deepcopy(dict(doc))
        if kind == "Pod":
            pod = pods[f"{namespace}/{name}"]
            meta = out.setdefault("metadata", {})
            meta["namespace"] = namespace
            meta.setdefault("annotations", {})[NETNS_ANNOTATION] = f"{NETNS_DIR}/{pod.netns}"
            if pod.key in cgroups:
                meta["annotations"][CGROUP_ANNOTATION] = cgroups[pod.key]
            body = out.setdefault("spec", {})
            body["nodeName"] = pod.node
            body["serviceAccountName"] = pod.service_account
            out["status"] = {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}
        elif kind == "Service":
            svc = services[f"{namespace}/{name}"]
            out["metadata"]["namespace"] = namespace
            body = out["spec"]
            body["clusterIP"] = svc.vip
            body["clusterIPs"] = [svc.vip]
            for port, (number_, target) in zip(body["ports"], svc.ports, strict=True):
                port.update(port=number_, targetPort=target, protocol="TCP")
        rendered.append(out)
    # Stable sort: namespaces, then pods, then services, then the rest, each in input order.
    rendered.sort(key=lambda d: _KIND_ORDER.get(d["kind"], len(_KIND_ORDER)))
    return rendered


def dump_workloads(docs: list[dict[str, Any]]) -> str:
    return WORKLOADS_HEADER + str(yaml.safe_dump_all(docs, sort_keys=False))


def status_json(plan: LabPlan) -> dict[str, Any]:
    """The shape `trellis lab status --json` promises; other tools parse it."""
    return {
        "nodes": [{"name": n.name, "netns": n.netns, "address": n.address, "uplink": n.uplink}
                  for n in plan.nodes],
        "pods": [{"name": p.name, "namespace": p.namespace, "node": p.node, "netns": p.netns,
                  "ip": p.ip, "service_account": p.service_account, "labels": dict(p.labels),
                  "enrolled": p.enrolled} for p in plan.pods],
        "services": [{"name": s.name, "namespace": s.namespace, "vip": s.vip,
                      "ports": [{"port": a, "targetPort": b} for a, b in s.ports]}
                     for s in plan.services],
    }


def status_table(plan: LabPlan, states: Mapping[str, str], mesh: bool) -> str:
    """A readable summary; ``states`` maps node/pod names to what their process is doing."""
    nodes = [("NODE", "NETNS", "ADDRESS", "UPLINK", "PODS", "MESH PROCESSES")]
    nodes += [(n.name, n.netns, n.address, n.uplink, n.pod_subnet,
               states.get(n.name, "-") if mesh else "off (--no-mesh)") for n in plan.nodes]
    pods = [("POD", "NODE", "IP", "SERVICE ACCOUNT", "MESH", "APP")]
    pods += [(p.key, p.node, p.ip, p.service_account, "enrolled" if p.enrolled else "-",
              states.get(p.key, "-")) for p in plan.pods]
    services = [("SERVICE", "VIP", "PORTS")]
    services += [(s.key, s.vip, ", ".join(f"{a}->{b}" for a, b in s.ports))
                 for s in plan.services]
    return "\n\n".join(_table(rows) for rows in (nodes, pods, services))


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
