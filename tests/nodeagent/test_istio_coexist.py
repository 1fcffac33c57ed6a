"""Beside Istio ambient (nodeagent/istio_coexist.py): what Istio ambient manages is
never enrolled, by the reconciler, the proxy or the CNI hook, and each refusal is
logged naming it and counted; what Istio does not manage is enrolled as before."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.cni.fallback import Fallback, verdicts
from nodeagent.cni.protocol import PodRequest
from nodeagent.cni_server import Decision, decide
from nodeagent.enroll import enrolled_pods
from nodeagent.istio_coexist import CoexistingSource, refuse
from nodeagent.objects import Snapshot, parse_documents

pytestmark = pytest.mark.unit


def ns(name: str, **labels: str) -> dict[str, object]:
    return {"kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": name, "labels": labels}}


def pod(name: str, namespace: str, ip: str, **labels: str) -> dict[str, object]:
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                         "labels": labels},
            "spec": {"nodeName": "node-1", "serviceAccountName": "default"},
            "status": {"podIP": ip, "phase": "Running"}}


TRELLIS = {"trellis.dev/dataplane-mode": "ambient"}
ISTIO = {"istio.io/dataplane-mode": "ambient"}


def snapshot() -> Snapshot:
    return parse_documents([
        ns("both", **TRELLIS, **ISTIO),  # labelled for both meshes: Istio's
        ns("ours", **TRELLIS),
        ns("theirs", **ISTIO),
        pod("b1", "both", "10.0.0.1"),
        pod("b2", "both", "10.0.0.2", **{"istio.io/dataplane-mode": "none"}),  # Istio opts out
        pod("o1", "ours", "10.0.0.3"),
        pod("o2", "ours", "10.0.0.4", **ISTIO),  # the pod itself asks Istio
        pod("t1", "theirs", "10.0.0.5", **TRELLIS),  # Trellis label, Istio's namespace
    ], source="test")


def test_only_what_istio_does_not_manage_is_enrolled() -> None:
    raw = snapshot()
    # Positive control: without the rule, Trellis would enroll all five.
    assert {w.name for w in enrolled_pods(raw.state, "node-1")} == {"b1", "b2", "o1", "o2", "t1"}
    cleaned, refusals = refuse(raw)
    assert {w.name for w in enrolled_pods(cleaned.state, "node-1")} == {"b2", "o1"}
    assert refusals.namespaces == {"both"}
    assert refusals.pods == {"both/b1", "ours/o2", "theirs/t1"}


def test_the_cni_hook_and_its_fallback_agree() -> None:
    cleaned, _ = refuse(snapshot())
    unknown = _request("new-pod", "both")
    assert decide(snapshot().state, unknown)[0] is Decision.REDIRECT  # control
    assert decide(cleaned.state, unknown)[0] is Decision.SKIP
    assert decide(cleaned.state, _request("new-pod", "ours"))[0] is Decision.REDIRECT
    assert verdicts(cleaned.state)["both"] is Fallback.WAIT  # b2 is still enrolled there
    only_istio = refuse(parse_documents([ns("both", **TRELLIS, **ISTIO)], source="t"))[0]
    assert verdicts(only_istio.state)["both"] is Fallback.PASS


def _request(name: str, namespace: str) -> PodRequest:
    return PodRequest(op="add", container_id="c", pod_name=name, pod_namespace=namespace,
                      netns="/x")


class _Replay:
    node = "node-1"

    def __init__(self, *snapshots: Snapshot) -> None:
        self._snapshots = snapshots

    async def _gen(self) -> AsyncIterator[Snapshot]:
        for s in self._snapshots:
            yield s

    def snapshots(self) -> AsyncIterator[Snapshot]:
        return self._gen()


def test_refusals_are_logged_once_naming_them_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    later = parse_documents([ns("both", **TRELLIS), pod("b1", "both", "10.0.0.1")],
                            source="test")  # Istio's label removed from the namespace
    source = CoexistingSource(_Replay(snapshot(), snapshot(), later),
                              registry=CollectorRegistry())
    seen: list[tuple[int, float, float]] = []

    async def main() -> None:
        async for s in source.snapshots():
            seen.append((len(enrolled_pods(s.state, "node-1")),
                         source.refused.labels(kind="namespace")._value.get(),
                         source.refused.labels(kind="pod")._value.get()))

    with caplog.at_level(logging.INFO, logger="trellis.nodeagent.istio"):
        asyncio.run(main())
    assert seen == [(2, 1, 3), (2, 1, 3), (1, 0, 0)]
    refused = [r.fields["name"] for r in caplog.records  # type: ignore[attr-defined]
               if r.levelno == logging.WARNING]
    # Once each, not again for the identical second snapshot; b1 is said with its namespace.
    assert refused == ["both", "ours/o2", "theirs/t1"]
    back = [r.fields["name"] for r in caplog.records  # type: ignore[attr-defined]
            if r.levelno == logging.INFO]
    assert back == ["both", "ours/o2", "theirs/t1"]
