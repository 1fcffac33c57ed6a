"""Root namespaces per API group (nodeagent/policies.py): a security.istio.io policy is
mesh-wide in Istio's root namespace, as Istio treats it; a security.trellis.dev one
in Trellis's. Neither root namespace widens the other group's policies."""

from __future__ import annotations

import pytest

from nodeagent.policies import PolicyLoader

pytestmark = pytest.mark.unit


def deny(name: str, namespace: str, group: str) -> dict[str, object]:
    return {"apiVersion": f"{group}/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {
                "principals": ["cluster.local/ns/demo/sa/legacy"]}}]}]}}


def applying_in(loader: PolicyLoader, namespace: str) -> set[str]:
    docs = (deny("istio-root", "istio-system", "security.istio.io"),
            deny("trellis-root", "trellis-system", "security.trellis.dev"),
            deny("istio-in-trellis-root", "trellis-system", "security.istio.io"),
            deny("trellis-in-istio-root", "istio-system", "security.trellis.dev"),
            deny("local", "demo", "security.istio.io"))
    index = loader.load(docs, "test")
    return {p.name for p in index.applicable(namespace, {"app": "web"})}


def test_each_group_is_mesh_wide_in_its_own_root_namespace() -> None:
    assert applying_in(PolicyLoader("trellis-system"), "demo") == {
        "istio-root", "trellis-root", "local"}
    assert applying_in(PolicyLoader("trellis-system"), "other") == {"istio-root", "trellis-root"}


def test_istios_root_namespace_is_configurable() -> None:
    loader = PolicyLoader("trellis-system", istio_root_namespace="mesh-root")
    assert applying_in(loader, "other") == {"trellis-root"}
