"""The verdicts the agent leaves for the plugin, for the time no agent runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.cni.fallback import (
    HEADER,
    Fallback,
    fallback_path,
    parse,
    read,
    render,
    verdicts,
    write,
)
from tunnel.state import AMBIENT, DATAPLANE_LABEL, MeshState, Workload

pytestmark = pytest.mark.unit


def _pod(namespace: str, enrolled: bool) -> Workload:
    return Workload(uid=f"u-{namespace}", name="p", namespace=namespace, node="n1",
                    ip="10.0.0.1", service_account="sa", labels={}, enrolled=enrolled)


def test_ambient_and_self_enrolled_namespaces_wait_the_rest_pass() -> None:
    state = MeshState(
        workloads=(_pod("mixed", True), _pod("plain", False), _pod("unlisted", True)),
        namespace_labels={"demo": {DATAPLANE_LABEL: AMBIENT}, "plain": {}, "mixed": {},
                          "opted-out": {DATAPLANE_LABEL: "none"}})
    assert verdicts(state) == {"demo": Fallback.WAIT, "mixed": Fallback.WAIT,
                               "unlisted": Fallback.WAIT, "plain": Fallback.PASS,
                               "opted-out": Fallback.PASS}


def test_render_is_sorted_lines_and_leaves_out_names_the_format_cannot_hold() -> None:
    text = render({"b": Fallback.PASS, "a": Fallback.WAIT, "bad name\npass x": Fallback.PASS,
                   "UPPER": Fallback.PASS})
    assert text == HEADER + "wait a\npass b\n"


def test_written_whole_next_to_the_socket(tmp_path: Path) -> None:
    path = fallback_path(tmp_path / "cni.sock")
    assert path == tmp_path / "cni.sock.fallback"
    write(path, HEADER)
    write(path, HEADER + "pass x\n")
    assert path.read_text() == HEADER + "pass x\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cni.sock.fallback"]  # no temporaries


def test_what_is_written_reads_back_and_anything_else_is_no_verdict(tmp_path: Path) -> None:
    table = {"a": Fallback.WAIT, "b": Fallback.PASS}
    assert parse(render(table)) == table
    assert parse("trellis-cni-fallback 2\npass a\n") == {}
    assert parse(HEADER + "pass\nmaybe a\npass B\npass ok\n") == {"ok": Fallback.PASS}
    assert read(tmp_path / "missing") == {}
