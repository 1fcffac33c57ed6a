"""A tiny benchmark run end to end: its own labs (an iptables one and an eBPF side
lab, brought up and taken down by the bench), direct, trellis and trellis-ebpf,
one-second or shorter workloads, 50 held connections.
It checks the plumbing — figures come out, the JSON and the chart are written,
nothing is left behind — never how fast anything is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import runner
from bench.labsetup import side_lab
from bench.workloads import Durations
from lab import network, redirect_mode
from lab.state import ENV_DIR, ENV_PREFIX, LabDir

pytestmark = pytest.mark.e2e

PREFIX = "tlab-bsmoke-"


def test_a_tiny_run_writes_figures_and_cleans_up(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    labdir = LabDir(tmp_path / "lab")
    monkeypatch.setenv(ENV_PREFIX, PREFIX)
    monkeypatch.setenv(ENV_DIR, str(labdir.root))
    settings = runner.Settings(("direct", "trellis", "trellis-ebpf"), 1,
                               Durations(bulk=1, rr=0.5, crr=0.5, hold_connections=50),
                               tmp_path / "results")
    lines: list[str] = []
    outcome = runner.run(settings, labdir, lines.append)

    failed = [line for line in lines if "FAILED" in line]
    assert not failed, failed
    document = json.loads(outcome.json_path.read_text())
    trellis, direct = document["scenarios"]["trellis"], document["scenarios"]["direct"]
    assert trellis["bulk_gbps_1"]["median"] > 0 and direct["bulk_gbps_1"]["median"] > 0
    assert trellis["rr_p50_us"]["median"] > 0 and trellis["crr_per_s"]["median"] > 0
    assert trellis["cpu_s_per_1k_req"] is not None  # the agents' CPU was read
    assert trellis["rss_kb_1k_conns"] is not None, lines  # all 50 held connections opened
    assert direct["cpu_s_per_gb"] is None  # no proxy on the direct path
    ebpf = document["scenarios"]["trellis-ebpf"]
    assert ebpf["crr_per_s"]["median"] > 0 and ebpf["rr_p99_us"]["median"] > 0
    assert ebpf["cpu_s_per_1k_req"] is not None  # the eBPF lab's agents did the work
    assert set(document["ebpf_vs_iptables"]) == {"crr_per_s", "rr_p50_us", "rr_p99_us"}
    side_dir, side_prefix = side_lab(labdir, PREFIX, "ebpf")
    assert document["meta"]["labs_by_redirect_mode"] == {
        "iptables": str(labdir.root), "ebpf": str(side_dir.root)}
    assert outcome.chart_path is not None and outcome.chart_path.stat().st_size > 0
    assert network.lab_namespaces(PREFIX) == []  # the bench took its labs down
    assert network.lab_namespaces(side_prefix) == []
    assert not Path(redirect_mode.bpf_root(side_prefix, "node-1")).parent.exists()
    assert not side_dir.root.exists()
