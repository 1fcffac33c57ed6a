"""Live connections are re-decided against the policies the feed hands over, stand-ins
included (issue 10, finding 6: the re-check used the set with the invalid policy dropped)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from policy import PolicyIndex, enforce, load_yaml
from tunnel.authorize import recheck_live_connections
from tunnel.context import StateView
from tunnel.metrics import ProxyMetrics
from tunnel.state import MeshState, Workload

pytestmark = pytest.mark.unit

BACKEND = Workload(uid="b", name="backend-1", namespace="demo", node="node-1", ip="10.0.2.7",
                   service_account="backend", labels={"app": "backend"}, enrolled=True)
FRONTEND = Workload(uid="f", name="frontend-1", namespace="demo", node="node-2",
                    ip="10.0.1.5", service_account="frontend", labels={"app": "frontend"},
                    enrolled=True)
ALLOW = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: demo}
spec:
  selector: {matchLabels: {app: backend}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/demo/sa/frontend"]}
    to:
    - operation: {ports: ["%s"]}
"""


class Handle:
    def __init__(self) -> None:
        self.closed: str | None = None

    def close(self, reason: str) -> None:
        self.closed = reason


def _recheck(index: PolicyIndex) -> tuple[int, Handle, ProxyMetrics]:
    """One live inbound connection frontend → backend:8080, re-decided under ``index``."""
    handle, metrics = Handle(), ProxyMetrics()
    live = SimpleNamespace(direction="inbound", source_ip=FRONTEND.ip, dest_port=8080,
                           source_principal="spiffe://cluster.local/ns/demo/sa/frontend",
                           handle=handle)
    pod = SimpleNamespace(workload=BACKEND, connections=[live])
    inputs: Any = SimpleNamespace(
        state=StateView(MeshState(workloads=(BACKEND, FRONTEND)), index), metrics=metrics)
    return recheck_live_connections(inputs, [pod]), handle, metrics  # type: ignore[list-item]


def test_an_invalid_edit_keeps_live_connections_its_last_valid_version_allows() -> None:
    valid = enforce(load_yaml(ALLOW % "8080"))
    assert _recheck(PolicyIndex.build(valid.policies))[0] == 0
    edited = enforce(load_yaml(ALLOW % "80a"), valid.last_valid)
    closed, handle, _ = _recheck(PolicyIndex.build(edited.policies))
    assert (closed, handle.closed) == (0, None)


def test_a_never_valid_allow_closes_live_connections_to_what_it_selects() -> None:
    broken = enforce(load_yaml(ALLOW % "80a"))
    closed, handle, metrics = _recheck(PolicyIndex.build(broken.policies))
    assert closed == 1 and handle.closed == "denied by policy demo/allow-frontend"
    assert metrics.registry.get_sample_value("trellis_policy_denials_total", {
        "policy": "demo/allow-frontend", "reason": "invalid_policy"}) == 1
    # What the review measured: with the invalid policy dropped, nothing is closed.
    dropped = PolicyIndex.build(load_yaml(ALLOW % "80a").policies)
    assert _recheck(dropped)[0] == 0
