"""Imports flow one way: identity ← policy ← tunnel ← nodeagent ← {lab, bench} ← trellis."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("identity", "policy", "tunnel", "nodeagent", "bpf", "waypoint", "lab", "bench",
            "trellis")
ALLOWED = {
    "identity": {"identity"},
    "policy": {"identity", "policy"},
    "tunnel": {"identity", "policy", "tunnel"},
    "nodeagent": {"identity", "policy", "tunnel", "nodeagent", "bpf"},
    "bpf": {"bpf"},
    "waypoint": {"identity", "policy", "tunnel", "waypoint"},
    "lab": {"identity", "policy", "tunnel", "nodeagent", "bpf", "lab"},
    "bench": {"identity", "policy", "tunnel", "nodeagent", "bpf", "lab", "bench"},
    "trellis": set(PACKAGES),
}


def _imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_flow_one_way(package: str) -> None:
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_packages(path) - ALLOWED[package]
        if bad:
            violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not violations, "\n".join(violations)


def test_the_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("from nodeagent.agent import Reconciler\n")
    assert _imported_packages(bad) - ALLOWED["tunnel"] == {"nodeagent"}
