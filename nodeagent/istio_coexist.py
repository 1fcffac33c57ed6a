"""Living beside Istio ambient: never enroll what Istio ambient manages.

Both meshes capture a pod's traffic inside its network namespace and listen on
the same ports (15001, 15006, 15008), so a pod enrolled by both would belong to
whichever bound first and break in the other. When Istio ambient is installed
(``--istio-coexistence``, the chart's ``istioCoexistence``), Trellis leaves
alone every pod Istio ambient manages, by Istio's own rule: the pod's label
``istio.io/dataplane-mode`` is ``ambient``, or it is not ``none`` and the pod's
namespace carries ``istio.io/dataplane-mode=ambient``.

It is done in one place, on each snapshot as the source yields it (`refuse`),
so the reconciler, the proxy, the CNI hook and its fallback verdicts all see
the same thing: such pods are not enrolled, and in a namespace Istio manages
the Trellis label reads as absent (a pod the CNI hook sees before the snapshot
has it is not redirected either). Each namespace or pod refused is logged once,
when it starts and when it ends, naming it, and counted in
``trellis_istio_refused{kind}`` (how many are refused now).

Why a setting and not detection through the API server (ztunnel's DaemonSet,
istio-cni's pods): the agent watches only its own node's pods and the proxy
the whole cluster, so a detected "Istio is here" could differ between the two
processes of one node, and between nodes, and a pod enrolled by one and not
the other is worse than either. A setting is one rule everywhere. Without it,
``istio.io/dataplane-mode`` means nothing to Trellis (issue 15 will let it
enroll pods on clusters without Istio, where this setting is off).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType

from prometheus_client import CollectorRegistry, Gauge

from nodeagent.objects import Snapshot
from nodeagent.source import WorkloadSource
from tunnel.state import AMBIENT, DATAPLANE_LABEL, NONE

log = logging.getLogger("trellis.nodeagent.istio")

ISTIO_DATAPLANE_LABEL = "istio.io/dataplane-mode"


class Refused(enum.Enum):
    NAMESPACE = "namespace"
    POD = "pod"


def istio_manages_namespace(labels: Mapping[str, str]) -> bool:
    return labels.get(ISTIO_DATAPLANE_LABEL) == AMBIENT


def istio_manages_pod(pod_labels: Mapping[str, str], ns_labels: Mapping[str, str]) -> bool:
    mode = pod_labels.get(ISTIO_DATAPLANE_LABEL)
    if mode == AMBIENT:
        return True
    return mode != NONE and istio_manages_namespace(ns_labels)


@dataclasses.dataclass(frozen=True)
class Refusals:
    namespaces: frozenset[str] = frozenset()  # Trellis-labelled namespaces Istio manages
    pods: frozenset[str] = frozenset()  # namespace/name of pods Trellis would enroll


def refuse(snapshot: Snapshot) -> tuple[Snapshot, Refusals]:
    """``snapshot`` without anything Istio ambient manages enrolled. Pure."""
    state = snapshot.state
    empty: Mapping[str, str] = {}
    namespaces = frozenset(
        ns for ns, labels in state.namespace_labels.items()
        if istio_manages_namespace(labels) and labels.get(DATAPLANE_LABEL) == AMBIENT)
    pods: list[str] = []
    workloads = []
    for w in state.workloads:
        if w.enrolled and istio_manages_pod(w.labels, state.namespace_labels.get(w.namespace,
                                                                                 empty)):
            pods.append(w.key)
            w = dataclasses.replace(w, enrolled=False)
        workloads.append(w)
    if not namespaces and not pods:
        return snapshot, Refusals()
    labels = {ns: (MappingProxyType({k: v for k, v in lb.items() if k != DATAPLANE_LABEL})
                   if ns in namespaces else lb)
              for ns, lb in state.namespace_labels.items()}
    state = dataclasses.replace(state, workloads=tuple(workloads),
                                namespace_labels=MappingProxyType(labels))
    return dataclasses.replace(snapshot, state=state), Refusals(namespaces, frozenset(pods))


class CoexistingSource:
    """A source whose snapshots never enroll what Istio ambient manages."""

    def __init__(self, inner: WorkloadSource, *,
                 registry: CollectorRegistry | None = None) -> None:
        self._inner = inner
        self.node = inner.node
        self.refused = Gauge("trellis_istio_refused", "Namespaces and pods Trellis would "
                             "enroll but leaves to Istio ambient, which manages them.",
                             ["kind"], registry=registry or CollectorRegistry())
        self._last = Refusals()
        self._set_gauge()

    def snapshots(self) -> AsyncIterator[Snapshot]:
        return self._follow()

    async def _follow(self) -> AsyncIterator[Snapshot]:
        async for snapshot in self._inner.snapshots():
            cleaned, refusals = refuse(snapshot)
            self._report(refusals)
            yield cleaned

    def _report(self, now: Refusals) -> None:
        before, self._last = self._last, now
        for kind, was, nxt in ((Refused.NAMESPACE, before.namespaces, now.namespaces),
                               (Refused.POD, before.pods, now.pods)):
            # A pod of a refused namespace is said with its namespace: one line, not
            # one per pod (anyone who may label pods could otherwise fill the log).
            for name in sorted(n for n in nxt - was
                               if kind is Refused.NAMESPACE
                               or n.partition("/")[0] not in now.namespaces):
                log.warning("not enrolled: Istio ambient manages it (istio.io/dataplane-mode"
                            "=ambient) and both meshes use the same ports", extra={"fields": {
                                "kind": kind.value, "name": name}})
            for name in sorted(n for n in was - nxt
                               if kind is Refused.NAMESPACE
                               or n.partition("/")[0] not in before.namespaces):
                log.info("no longer left to Istio ambient", extra={"fields": {
                    "kind": kind.value, "name": name}})
        self._set_gauge()

    def _set_gauge(self) -> None:
        self.refused.labels(kind=Refused.NAMESPACE.value).set(len(self._last.namespaces))
        self.refused.labels(kind=Refused.POD.value).set(len(self._last.pods))
