"""Acceptance 2 and 4 of issue 17: the chart from ``helm template`` installs and
works, on a cluster without Istio's CRDs and on one with them."""

from __future__ import annotations

import pytest

from tests.cluster.apps import AMBIENT, app_spec, namespace, request, trellis_rules
from tests.cluster.chart import render
from tests.cluster.cluster import ROOT, Cluster, wait_for
from tests.cluster.install import AGENT_DS, PROXY_DS, install, wait_ready
from tests.nodeagent.fake_apiserver import ISTIO_POLICIES

pytestmark = pytest.mark.cluster

CHART = ROOT / "deploy" / "charts" / "trellis"


def metrics(cluster: Cluster, agent) -> str:  # type: ignore[no-untyped-def]
    from lab import nsenter
    status, body = nsenter.http_get(agent.node.netns, agent.facts.ip, 15020, "/metrics")
    assert status == 200
    return body.decode()


@pytest.mark.parametrize("istio", [False, True], ids=["without-istio-crds", "with-istio-crds"])
def test_default_install_enrolls_a_new_pod_that_reaches_another_node_over_hbone(
        istio: bool) -> None:
    extra = frozenset({ISTIO_POLICIES}) if istio else frozenset()
    with Cluster(render(CHART), extra_crds=extra) as cluster:
        installed = install(cluster)
        namespace(cluster, "demo", AMBIENT)
        server = cluster.run_pod("node-2", "backend", "demo", app_spec("backend"), {"app": "b"})
        client = cluster.run_pod("node-1", "frontend", "demo", app_spec("frontend"),
                                 {"app": "f"})
        wait_ready(cluster, server)
        wait_ready(cluster, client)
        assert trellis_rules(client), "the new pod was not redirected"
        answer = wait_for("frontend reaches backend", lambda: request(client, server),
                          detail=lambda: cluster.logs(installed.on(AGENT_DS, "node-1"))
                          + cluster.logs(installed.on(PROXY_DS, "node-1")))
        assert answer["pod"] == "backend"
        assert answer["peer"].split(":")[0] == client.facts.ip  # the client's address kept
        inbound = [line for line in metrics(cluster, installed.on(PROXY_DS, "node-2")).splitlines()
                   if line.startswith("istio_tcp_connections_opened_total")
                   and 'reporter="destination"' in line]
        assert any('connection_security_policy="mutual_tls"' in line for line in inbound), inbound
