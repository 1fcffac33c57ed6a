"""Workloads of the harness's users: the demo HTTP app (lab/app.py) as a pod spec,
and looking into pods (their rules, a request from inside)."""

from __future__ import annotations

import json
import sys
from typing import Any

from lab import nsenter
from tests.cluster.cluster import ROOT, Cluster
from tests.cluster.nodes import in_netns
from tests.cluster.runtime import Pod

APP_PORT = 8080
AMBIENT = {"trellis.dev/dataplane-mode": "ambient"}


def app_spec(name: str, service_account: str = "web") -> dict[str, Any]:
    """A non-root app container, as a typical Deployment would run it."""
    return {"serviceAccountName": service_account,
            "securityContext": {"runAsUser": 1000, "runAsGroup": 1000},
            "containers": [{
                "name": "app", "command": [sys.executable, "-m", "lab.app", "--name", name,
                                           "--port", str(APP_PORT)],
                "env": [{"name": "PYTHONPATH", "value": str(ROOT)}],
                "readinessProbe": {"tcpSocket": {"port": APP_PORT}},
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}}}]}


def namespace(cluster: Cluster, name: str, labels: dict[str, str]) -> None:
    cluster.apply("/api/v1/namespaces", {"metadata": {"name": name, "uid": f"ns-{name}",
                                                      "labels": labels}})


def request(client: Pod, server: Pod, timeout: float = 5.0) -> dict[str, Any]:
    """GET / from inside the client pod's network namespace to the server pod."""
    status, body = nsenter.http_get(client.netns, server.facts.ip, APP_PORT, "/",
                                    timeout=timeout)
    assert status == 200, (status, body)
    answer: dict[str, Any] = json.loads(body)
    return answer


def rules(pod: Pod) -> str:
    """Every netfilter rule in the pod, as iptables-save shows them (both back ends)."""
    return in_netns(pod.netns, "iptables-save") + in_netns(pod.netns, "nft", "list", "ruleset")


def trellis_rules(pod: Pod) -> list[str]:
    return [line for line in rules(pod).splitlines() if "TRELLIS" in line.upper()]
