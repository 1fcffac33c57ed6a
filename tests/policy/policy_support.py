"""Builders for AuthorizationPolicy documents and connection facts, for the policy tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policy import (
    ConnectionFacts,
    Decision,
    Document,
    LoadResult,
    PolicyIndex,
    evaluate,
    load_policies,
)

ROOT = "trellis-system"
FRONTEND = "spiffe://cluster.local/ns/demo/sa/frontend"
Doc = dict[str, Any]


def policy(name: str, *rules: Mapping[str, Any] | None, action: str | None = None,
           namespace: str = "demo", selector: Mapping[str, str] | None = None,
           api_version: str = "security.istio.io/v1", no_rules: bool = False) -> Doc:
    """One AuthorizationPolicy document; ``no_rules`` leaves ``rules`` out."""
    spec: Doc = {}
    if action is not None:
        spec["action"] = action
    if selector is not None:
        spec["selector"] = {"matchLabels": dict(selector)}
    if not no_rules:
        spec["rules"] = [dict(r) if r is not None else None for r in rules]
    return {"apiVersion": api_version, "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def allow(name: str, *rules: Mapping[str, Any] | None, **kw: Any) -> Doc:
    return policy(name, *rules, action="ALLOW", **kw)


def deny(name: str, *rules: Mapping[str, Any] | None, **kw: Any) -> Doc:
    return policy(name, *rules, action="DENY", **kw)


def audit(name: str, *rules: Mapping[str, Any] | None, **kw: Any) -> Doc:
    return policy(name, *rules, action="AUDIT", **kw)


def rule(frm: Sequence[Doc] | None = None, to: Sequence[Doc] | None = None,
         when: Sequence[Doc] | None = None) -> Doc:
    result: Doc = {}
    if frm is not None:
        result["from"] = list(frm)
    if to is not None:
        result["to"] = list(to)
    if when is not None:
        result["when"] = list(when)
    return result


def src(**fields: list[str]) -> Doc:
    return {"source": fields}


def op(**fields: list[str]) -> Doc:
    return {"operation": fields}


def cond(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> Doc:
    result: Doc = {"key": key}
    if values is not None:
        result["values"] = values
    if not_values is not None:
        result["notValues"] = not_values
    return result


def facts(principal: str | None = FRONTEND, source_ip: str = "10.0.1.5",
          namespace: str = "demo", labels: Mapping[str, str] | None = None,
          dest_ip: str = "10.0.2.7", port: int = 8080,
          source_namespace: str | None = None) -> ConnectionFacts:
    return ConnectionFacts(
        source_principal=principal, source_ip=source_ip, source_namespace=source_namespace,
        dest_namespace=namespace,
        dest_labels={"app": "backend", "version": "v1"} if labels is None else dict(labels),
        dest_ip=dest_ip, dest_port=port)


def load(*docs: object, root_namespace: str = ROOT) -> LoadResult:
    documents = [Document(d, f"test document {i}") for i, d in enumerate(docs, start=1)]
    return load_policies(documents, root_namespace=root_namespace)


def decide(docs: Sequence[object], connection: ConnectionFacts) -> Decision:
    """The decision, checked to be the same through the index and a plain list."""
    loaded = load(*docs)
    assert loaded.errors == (), [str(e) for e in loaded.errors]
    through_index = evaluate(connection, PolicyIndex.build(loaded.policies))
    through_list = evaluate(connection, list(loaded.policies))
    assert through_index == through_list
    return through_index
