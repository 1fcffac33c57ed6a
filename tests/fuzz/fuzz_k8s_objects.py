"""Fuzz the workload file reader (nodeagent/objects.py, nodeagent/object_fields.py).

Input: the bytes of a workload file (``--source file``, ``trellis lab apply``):
multi-document YAML of Kubernetes objects, as kubectl prints them. A file that
is not YAML raises ``SourceError`` naming the file; a bad object inside is
reported in ``Snapshot.errors`` and never raises.
"""

from __future__ import annotations

from fuzz_k8s_watch import check_snapshot

from nodeagent.objects import SourceError, parse_yaml

ALLOWED: tuple[type[BaseException], ...] = (SourceError,)
MAX_LEN = 16 * 1024
DICTIONARY = (b"\n---\n", b"kind: ", b"Pod", b"Service", b"EndpointSlice", b"Namespace",
              b"List", b"items:", b"metadata:", b"spec:", b"status:", b"podIP: ", b"labels:",
              b"annotations:", b"ports:", b"- ", b"{", b"}", b"[", b"]", b": ", b"!!int ",
              b"!!float ", b"!!binary ", b"!!timestamp ", b"!!set ", b"!!omap ", b"&a ", b"*a",
              b"<<: ", b"2024-02-30", b"2026-12-07T21:04:11Z", b"~", b".nan", b"0x", b"'",
              b'"', b"|\n", b"? ")


def one_input(data: bytes) -> None:
    snapshot = parse_yaml(data, source="workloads.yaml")
    assert all(isinstance(error, str) and error for error in snapshot.errors)
    check_snapshot(snapshot)
