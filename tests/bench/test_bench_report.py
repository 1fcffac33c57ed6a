"""The pure parts of the mesh benchmark: statistics, the ratio table, the results
JSON shape, the target check, and the chart written from fake results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import chart, report
from bench.stats import Summary, median, percentile, summarize

pytestmark = pytest.mark.unit

KEYS = ("bulk_gbps_1", "bulk_gbps_4", "rr_p50_us", "rr_p90_us", "rr_p99_us", "crr_per_s",
        "cpu_s_per_gb", "cpu_s_per_1k_req", "rss_kb_idle", "rss_kb_1k_conns")


def fake_runs() -> dict[str, list[dict[str, float | None]]]:
    def figures(scale: float, proxies: bool) -> dict[str, float | None]:
        f: dict[str, float | None] = {
            "bulk_gbps_1": 10 / scale, "bulk_gbps_4": 12 / scale, "rr_p50_us": 50 * scale,
            "rr_p90_us": 80 * scale, "rr_p99_us": 200 * scale, "crr_per_s": 5000 / scale,
            "rr_rate": 1000.0, "crr_p50_us": 300 * scale, "crr_p99_us": 900 * scale}
        for key in ("cpu_s_per_gb", "cpu_s_per_1k_req", "rss_kb_idle", "rss_kb_1k_conns",
                    "vcpu_at_1k_rps"):
            f[key] = scale if proxies else None
        return f
    return {"direct": [figures(1, False), figures(1.1, False), figures(0.9, False)],
            "trellis": [figures(4, True), figures(5, True), figures(3, True)],
            "trellis-ebpf": [figures(2, True), figures(3, True), figures(2.5, True)],
            "envoy": [figures(2, True), figures(2.5, True), figures(1.5, True)]}


def test_percentile_is_nearest_rank() -> None:
    samples = list(range(1, 101))  # 1..100
    assert percentile(samples, 50) == 50
    assert percentile(samples, 99) == 99
    assert percentile(samples, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([3, 1, 2], 50) == 2  # sorts first


def test_percentile_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_median_and_summary() -> None:
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 2, 3]) == 2.5
    assert summarize([2.0, None, 1.0, 9.0]) == Summary(2.0, 1.0, 9.0)
    assert summarize([None, None]) is None


def test_results_document_has_the_issue_shape() -> None:
    document = report.results_document(fake_runs(), {"repetitions": 3})
    document = json.loads(json.dumps(document))  # what other tools read back
    assert set(document["scenarios"]) == {"direct", "trellis", "trellis-ebpf", "envoy"}
    for figures in document["scenarios"].values():
        assert set(KEYS) <= set(figures)
    bulk = document["scenarios"]["trellis"]["bulk_gbps_1"]
    assert bulk == {"median": 10 / 4, "min": 10 / 5, "max": 10 / 3}
    assert document["scenarios"]["direct"]["cpu_s_per_gb"] is None  # no proxies to measure
    assert len(document["runs"]["envoy"]) == 3


def test_ratio_divides_medians_and_tolerates_missing() -> None:
    assert report.ratio(Summary(4, 3, 5), Summary(2, 1, 3)) == 2.0
    assert report.ratio(None, Summary(2, 1, 3)) is None
    assert report.ratio(Summary(4, 3, 5), Summary(0, 0, 0)) is None


def test_table_shows_ratios_to_direct_and_envoy() -> None:
    table = report.render_table(report.summarize_runs(fake_runs()))
    lines = table.splitlines()
    assert lines[0].split() == ["figure", "scenario", "median", "min", "…", "max", "/direct",
                                "/envoy", "/trellis"]
    trellis_bulk = next(line for line in lines if line.startswith("bulk Gbit/s, 1 stream"))
    row = next(line for line in lines[lines.index(trellis_bulk):] if " trellis " in line)
    assert row.split()[-3:] == ["0.25x", "0.50x", "1.00x"]  # 2.5 against 10, 5 and itself
    ebpf = next(line for line in lines[lines.index(trellis_bulk):] if " trellis-ebpf " in line)
    assert ebpf.split()[-3:] == ["0.40x", "0.80x", "1.60x"]  # 4 against 10, 5 and 2.5
    cpu = next(i for i, line in enumerate(lines) if line.startswith("proxy CPU s per GB"))
    assert lines[cpu].split()[-5:] == ["-", "-", "-", "-", "-"]  # direct has no proxy CPU


def test_targets_compare_trellis_with_envoy() -> None:
    checks = {c.measure: c for c in report.target_checks(report.summarize_runs(fake_runs()))}
    bulk = checks["bulk Gbit/s (1 stream)"]
    assert bulk.value == pytest.approx(0.5) and bulk.met is False
    # p50 added over direct: trellis 200 - 50 = 150, envoy 100 - 50 = 50.
    assert checks["p50 added over direct"].value == pytest.approx(3.0)
    assert checks["new connections/s vs stunnel"].met is None  # stunnel did not run
    text = report.render_targets(list(checks.values()))
    assert "NOT met" in text and "not measured" in text


def test_added_latency_has_no_ratio_when_envoy_adds_nothing() -> None:
    runs = fake_runs()
    for figures in runs["envoy"]:
        figures["rr_p99_us"] = 1.0  # faster than direct: noise, not a baseline
    checks = {c.measure: c for c in report.target_checks(report.summarize_runs(runs))}
    assert checks["p99 added over direct"].value is None
    assert checks["p99 added over direct"].met is None


def test_ztunnel_line_is_per_node_proxy() -> None:
    line = report.render_ztunnel(report.summarize_runs(fake_runs()))
    assert "trellis 2.000 vCPU" in line  # median of 4, 5, 3 over two proxies
    assert "ztunnel (published) ~0.06 vCPU" in line


def test_chart_file_is_a_png(tmp_path: Path) -> None:
    written = chart.write_chart(report.summarize_runs(fake_runs()), tmp_path / "r.png")
    assert written == tmp_path / "r.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trellis_ebpf_has_every_figure_of_trellis_in_the_json() -> None:
    document = json.loads(json.dumps(report.results_document(fake_runs(), {})))
    ebpf, iptables = document["scenarios"]["trellis-ebpf"], document["scenarios"]["trellis"]
    assert set(ebpf) == set(iptables) and set(KEYS) <= set(ebpf)
    # Medians of 10/2, 10/3, 10/2.5 with their min and max.
    assert ebpf["bulk_gbps_1"] == {"median": 4.0, "min": 10 / 3, "max": 5.0}
    assert len(document["runs"]["trellis-ebpf"]) == 3


def test_ebpf_over_iptables_ratios_in_json_and_text() -> None:
    summaries = report.summarize_runs(fake_runs())
    ratios = report.redirect_ratios(summaries)
    # crr: medians 5000/2.5 over 5000/4; latency: 50*2.5 over 50*4.
    assert ratios == pytest.approx({"crr_per_s": 1.6, "rr_p50_us": 0.625, "rr_p99_us": 0.625})
    assert report.results_document(fake_runs(), {})["ebpf_vs_iptables"] == ratios
    text = report.render_redirect(summaries).splitlines()
    assert text[0].startswith("eBPF / iptables redirect")
    crr = next(line for line in text if "new connections/s" in line)
    assert "1.60x  (2,000.0 vs 1,250.0; higher is better)" in crr
    p99 = next(line for line in text if "RR p99" in line)
    assert "0.62x" in p99 and "lower is better" in p99


def test_ebpf_ratio_is_absent_when_one_mode_did_not_run() -> None:
    runs = fake_runs()
    del runs["trellis-ebpf"]
    summaries = report.summarize_runs(runs)
    assert set(report.redirect_ratios(summaries).values()) == {None}
    lines = report.render_redirect(summaries).splitlines()[1:]
    assert len(lines) == 3 and all("not measured" in line for line in lines)


def test_chart_has_a_bar_for_trellis_ebpf(tmp_path: Path) -> None:
    assert "trellis-ebpf" in chart.COLOURS  # its own colour, not the fallback grey
    written = chart.write_chart(report.summarize_runs(fake_runs()), tmp_path / "e.png")
    assert written is not None and written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
