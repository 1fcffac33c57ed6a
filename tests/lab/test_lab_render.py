"""What the lab writes for the agents and shows to people, and the command lines it runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lab.lifecycle import read_description
from lab.plan import LabPlan, plan_lab
from lab.processes import agent_process, app_process, ca_process, proxy_process
from lab.render import dump_workloads, render_workloads, status_json, status_table
from lab.spec import LabSpec, build_spec, load_documents
from lab.state import LabDir

pytestmark = pytest.mark.unit

POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: demo}
spec:
  selector: {matchLabels: {app: backend}}
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/frontend]}}]}]
"""


@pytest.fixture
def spec() -> LabSpec:
    documents = list(read_description(None).documents) + load_documents(POLICY, "p.yaml")
    return build_spec(documents, "lab")


@pytest.fixture
def plan(spec: LabSpec) -> LabPlan:
    return plan_lab(spec)


def test_pods_carry_ip_node_account_and_netns(spec: LabSpec, plan: LabPlan) -> None:
    docs = render_workloads(spec, plan)
    backend2 = next(d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"] == "backend-2")
    assert backend2["metadata"]["annotations"] == {"trellis.dev/netns": "/run/netns/tlab-backend-2"}
    assert backend2["spec"] == {"nodeName": "node-2", "serviceAccountName": "backend"}
    assert backend2["status"]["podIP"] == "198.18.2.11"


def test_services_carry_their_vip_and_policies_pass_through(spec: LabSpec, plan: LabPlan) -> None:
    docs = render_workloads(spec, plan)
    assert [d["kind"] for d in docs] == ["Namespace"] + ["Pod"] * 5 + ["Service"] * 2 + [
        "AuthorizationPolicy"]
    backend = docs[7]
    assert backend["spec"]["clusterIP"] == "198.19.0.11"
    assert backend["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    assert docs[-1] == yaml.safe_load(POLICY)


def test_rendering_leaves_the_description_untouched(spec: LabSpec, plan: LabPlan) -> None:
    before = yaml.safe_dump_all(list(spec.documents))
    render_workloads(spec, plan)
    assert yaml.safe_dump_all(list(spec.documents)) == before


def test_the_node_agent_reads_the_workloads_file_as_the_lab_planned(
        spec: LabSpec, plan: LabPlan) -> None:
    from nodeagent.objects import parse_yaml  # the reader on the other side of the contract
    snapshot = parse_yaml(dump_workloads(render_workloads(spec, plan)), source="workloads.yaml")
    assert snapshot.errors == ()
    seen = {w.name: (w.ip, w.node, w.service_account, w.enrolled, w.netns)
            for w in snapshot.state.workloads}
    assert seen == {p.name: (p.ip, p.node, p.service_account, p.enrolled,
                             f"/run/netns/{p.netns}") for p in plan.pods}
    assert {s.name: s.vip for s in snapshot.state.services} == {
        "frontend": "198.19.0.10", "backend": "198.19.0.11"}
    assert len(snapshot.policies) == 1


def test_status_json_has_exactly_the_promised_shape(plan: LabPlan) -> None:
    status = status_json(plan)
    assert set(status) == {"nodes", "pods", "services"}
    assert status["nodes"][1] == {"name": "node-2", "netns": "tlab-node-2",
                                  "address": "198.18.0.12", "uplink": "eth0"}
    assert status["pods"][2] == {
        "name": "legacy-1", "namespace": "demo", "node": "node-1", "netns": "tlab-legacy-1",
        "ip": "198.18.1.12", "service_account": "legacy",
        "labels": {"app": "legacy", "trellis.dev/dataplane-mode": "none"}, "enrolled": False}
    assert status["services"][0] == {"name": "frontend", "namespace": "demo",
                                     "vip": "198.19.0.10",
                                     "ports": [{"port": 80, "targetPort": 8080}]}


def test_status_table_lists_every_object(plan: LabPlan) -> None:
    table = status_table(plan, {"demo/backend-2": "running, pid 42"}, mesh=False)
    assert ("demo/backend-2   node-2  198.18.2.11  backend          enrolled  running, pid 42"
            in table)
    assert "node-1  tlab-node-1  198.18.0.11  eth0    198.18.1.0/24  off (--no-mesh)" in table
    assert "demo/backend   198.19.0.11  80->8080" in table


def test_mesh_command_lines_are_the_agreed_contract(plan: LabPlan) -> None:
    labdir = LabDir(Path("/run/trellis-lab"))
    ca = ca_process(plan, labdir, python="py")
    assert (ca.netns, ca.argv) == ("tlab-ctl", (
        "py", "-m", "trellis", "ca", "serve", "--state-dir", "/run/trellis-lab/ca",
        "--listen", "198.18.0.1:15012", "--workloads", "/run/trellis-lab/workloads.yaml",
        "--node-tokens", "/run/trellis-lab/tokens/digests.json"))
    proxy = proxy_process(plan, plan.nodes[1], labdir, python="py")
    assert (proxy.name, proxy.netns, proxy.argv) == ("proxy-node-2", "tlab-node-2", (
        "py", "-m", "trellis", "proxy", "run", "--node", "node-2",
        "--workloads", "/run/trellis-lab/workloads.yaml",
        "--ca-url", "https://198.18.0.1:15012", "--ca-root", "/run/trellis-lab/ca/root-cert.pem",
        "--token-file", "/run/trellis-lab/tokens/node-2.token",
        "--control-socket", "/run/trellis-lab/sockets/node-2.sock"))
    assert (proxy.ready.netns, proxy.ready.port, proxy.ready.path) == (
        "tlab-node-2", 15021, "/healthz/ready")
    # The proxy's ports and those it binds in each enrolled pod are checked first.
    assert [(p.owner, p.port) for p in proxy.ports] == [
        ("Node node-2", 15020), ("Node node-2", 15021),
        ("Pod demo/frontend-2", 15001), ("Pod demo/frontend-2", 15006),
        ("Pod demo/frontend-2", 15008), ("Pod demo/backend-2", 15001),
        ("Pod demo/backend-2", 15006), ("Pod demo/backend-2", 15008)]
    agent = agent_process(plan, plan.nodes[1], labdir, python="py")
    assert (agent.name, agent.netns, agent.argv) == ("agent-node-2", "tlab-node-2", (
        "py", "-m", "trellis", "agent", "run", "--node", "node-2",
        "--workloads", "/run/trellis-lab/workloads.yaml",
        "--control-socket", "/run/trellis-lab/sockets/node-2.sock",
        "--metrics", "127.0.0.1:15014", "--readiness", "127.0.0.1:15015"))
    assert (agent.ready.port, [(p.owner, p.port) for p in agent.ports]) == (
        15015, [("Node node-2", 15014), ("Node node-2", 15015)])
    app = app_process(plan, plan.pods[0], python="py")
    assert (app.name, app.netns, app.argv) == ("app-frontend-1", "tlab-frontend-1", (
        "py", "-m", "lab.app", "--name", "frontend-1", "--port", "8080"))
