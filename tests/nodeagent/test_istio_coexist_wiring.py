"""The workload source the agent and the proxy open (proxy_stack.open_source) leaves
Istio-managed pods unenrolled, and counts them, unless --no-istio-coexistence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.cli import register
from nodeagent.config import AgentConfig
from nodeagent.proxy_stack import open_source
from tunnel.config import ProxyConfig

pytestmark = pytest.mark.inprocess

WORKLOADS = """
apiVersion: v1
kind: Namespace
metadata: {name: both, labels: {trellis.dev/dataplane-mode: ambient,
                                istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: both, uid: u1}
spec: {nodeName: node-1}
status: {podIP: 198.18.1.10, phase: Running}
"""


def enrolled(tmp_path: Path, coexistence: bool) -> tuple[bool, float]:
    path = tmp_path / "workloads.yaml"
    path.write_text(WORKLOADS)
    config = AgentConfig(proxy=ProxyConfig(node="node-1"), workloads_file=path,
                         control_socket=tmp_path / "proxy.sock",
                         istio_coexistence=coexistence)
    registry = CollectorRegistry()

    async def main() -> bool:
        source = await open_source(config, registry)
        snapshots = source.snapshots()
        first = await asyncio.wait_for(anext(snapshots), 10)
        await snapshots.aclose()  # type: ignore[attr-defined]
        return first.state.workloads[0].enrolled

    return asyncio.run(main()), registry.get_sample_value(
        "trellis_istio_refused", {"kind": "pod"}) or 0.0


def test_istio_managed_pods_are_left_alone_unless_told_otherwise(tmp_path: Path) -> None:
    assert enrolled(tmp_path, coexistence=True) == (False, 1.0)
    assert enrolled(tmp_path, coexistence=False) == (True, 0.0)  # control


def test_the_flag_reaches_the_config() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    base = ["agent", "run", "--node", "n", "--control-socket", "/x"]
    assert parser.parse_args(base).istio_coexistence is True
    assert parser.parse_args([*base, "--no-istio-coexistence"]).istio_coexistence is False
