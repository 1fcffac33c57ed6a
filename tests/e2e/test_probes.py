"""Kubelet probes in the lab, as a user would see them: the node's agent SNATs the
node's own TCP to its enrolled pods to 169.254.7.127 (nodeagent/host_probe.py), so
such a connection reaches the app directly, while pods keep going through the mesh."""

from __future__ import annotations

import json

import pytest

from tests.e2e.labctl import curl_json, in_netns, node_netns, pod

pytestmark = pytest.mark.e2e


def test_the_node_reaches_an_enrolled_app_as_the_probe_source(lab: dict) -> None:
    backend = pod("backend-2")
    node = node_netns("node-2")
    rules = in_netns(node, "iptables-save", "-t", "nat").stdout
    assert f"-A TRELLIS_HOST_POSTRT -d {backend['ip']}/32 -p tcp -m owner --socket-exists" \
        in rules
    answer = json.loads(in_netns(node, "curl", "-sS", "--max-time", "10",
                                 f"http://{backend['ip']}:8080/").stdout)
    assert answer["pod"] == "backend-2"
    assert answer["peer"].split(":")[0] == "169.254.7.127"
    # The control: a pod's connection (captured, then relayed) keeps its own address.
    relayed = curl_json("legacy-1", f"http://{backend['ip']}:8080/")
    assert relayed["peer"].split(":")[0] == pod("legacy-1")["ip"]
