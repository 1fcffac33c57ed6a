"""Inbound authorization: the facts of a connection → a Decision, and its bookkeeping.

The decision itself is ``policy.evaluate`` (pure, Istio's order). This module
only gathers the facts the destination knows, and records a denial the same
way everywhere: a metric, an access-log line naming the policy.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from policy import Action, ConnectionFacts, Decision, evaluate
from tunnel.accesslog import ConnectionRecord, log_connection
from tunnel.context import ProxyInputs
from tunnel.metrics import MUTUAL_TLS, PLAINTEXT, connection_labels
from tunnel.served import LiveConnection, ServedPod
from tunnel.state import Workload

_log = logging.getLogger("trellis.tunnel.authorize")

DENIED_FLAG = "DENY"  # response_flags value on connections refused by policy


def decide(inputs: ProxyInputs, destination: Workload, *, source_principal: str | None,
           source_ip: str, dest_port: int) -> Decision:
    source = inputs.state.current.workload_by_ip(source_ip)
    facts = ConnectionFacts(
        source_principal=source_principal, source_ip=source_ip,
        source_namespace=source.namespace if source else None,
        dest_namespace=destination.namespace, dest_labels=destination.labels,
        dest_ip=destination.ip, dest_port=dest_port)
    decision = evaluate(facts, inputs.state.policies)
    if not decision.allowed and decision.policy is None:
        # Denied because ALLOW policies apply and none matched: name those, so
        # the access log and the denial metric say which policies to look at.
        allows = [p.key for p in inputs.state.policies.applicable(
            destination.namespace, destination.labels) if p.action is Action.ALLOW]
        decision = replace(decision, policy=",".join(allows) or None)
    if decision.audit:
        _log.info("audit policy matched", extra={"fields": {
            "pod": destination.key, "src": source_ip, "principal": source_principal,
            "audit": list(decision.audit), "allowed": decision.allowed}})
    return decision


def record_denial(inputs: ProxyInputs, pod: ServedPod, decision: Decision, *,
                  source_principal: str | None, source_ip: str, source_port: int,
                  dest_port: int, hbone: bool) -> None:
    me = pod.workload
    source = inputs.state.current.workload_by_ip(source_ip)
    labels = connection_labels(
        reporter="destination", source=source,
        source_principal=source_principal.removeprefix("spiffe://") if source_principal else None,
        destination=me, destination_principal=me.identity.principal, service=None,
        security_policy=MUTUAL_TLS if hbone else PLAINTEXT, cluster=inputs.config.cluster,
        response_flags=DENIED_FLAG)
    inputs.metrics.on_open(labels)
    inputs.metrics.on_close(labels, request_bytes=0, response_bytes=0)
    inputs.metrics.denials.labels(decision.policy or "", decision.reason).inc()
    log_connection(ConnectionRecord(
        direction="inbound", protocol="hbone" if hbone else "tcp",
        src_addr=f"{source_ip}:{source_port}", dst_addr=f"{me.ip}:{dest_port}",
        src_workload=source.key if source else None, dst_workload=me.key,
        src_identity=source_principal, dst_identity=me.identity.uri, dst_service=None,
        bytes_to_dst=0, bytes_from_dst=0, duration_ms=0.0,
        error=f"denied: {decision.reason}", policy=decision.policy))


def recheck_live_connections(inputs: ProxyInputs, pods: list[ServedPod]) -> int:
    """Close inbound connections that the current policies now deny; return how many."""
    closed = 0
    for pod in pods:
        for live in [c for c in pod.connections if c.direction == "inbound"]:
            decision = _redecide(inputs, pod, live)
            if decision.allowed or live.handle is None:
                continue
            _log.warning("closing live connection: policy now denies it", extra={"fields": {
                "pod": pod.workload.key, "src": live.source_ip,
                "principal": live.source_principal, "port": live.dest_port,
                "policy": decision.policy, "reason": decision.reason}})
            inputs.metrics.denials.labels(decision.policy or "", decision.reason).inc()
            live.handle.close(f"denied by policy {decision.policy or '(none matched)'}")
            closed += 1
    return closed


def _redecide(inputs: ProxyInputs, pod: ServedPod, live: LiveConnection) -> Decision:
    return decide(inputs, pod.workload, source_principal=live.source_principal,
                  source_ip=live.source_ip, dest_port=live.dest_port)
