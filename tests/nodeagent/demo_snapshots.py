"""Small YAML snapshots of the demo namespace, for the agent's and the feed's tests."""

from __future__ import annotations

from nodeagent.objects import Snapshot, parse_yaml

NAMESPACE = """\
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {trellis.dev/dataplane-mode: ambient}}
"""


def pod(name: str, ip: str, *, node: str = "node-1", sa: str = "web", mode: str = "") -> str:
    """One Pod document in namespace demo, its netns annotated as the lab does."""
    labels = f"{{app: web{', trellis.dev/dataplane-mode: ' + mode if mode else ''}}}"
    return (f"---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n"
            f"  labels: {labels}\n  annotations: {{trellis.dev/netns: /run/netns/{name}}}\n"
            f"spec: {{nodeName: {node}, serviceAccountName: {sa}}}\nstatus: {{podIP: {ip}}}\n")


def snapshot(*pods: str) -> Snapshot:
    return parse_yaml(NAMESPACE + "".join(pods), source="test.yaml")
