"""Pure rendering of benchmark results: the results document (JSON), the terminal
table with each figure's ratio to ``direct``, ``envoy`` and ``trellis``, the
Trellis / Envoy target check the issue sets, and the eBPF / iptables comparison
(``trellis-ebpf`` against ``trellis``).

Input is the raw figures of every repetition, ``{scenario: [{metric: value}]}``;
a figure a scenario cannot have (proxy CPU of ``direct``) is None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.stats import Summary, summarize

Runs = Mapping[str, Sequence[Mapping[str, float | None]]]
Summaries = Mapping[str, Mapping[str, Summary | None]]


@dataclass(frozen=True)
class Metric:
    key: str  # the name in the results JSON
    label: str
    higher_is_better: bool
    digits: int = 1


METRICS = (
    Metric("bulk_gbps_1", "bulk Gbit/s, 1 stream", True, 2),
    Metric("bulk_gbps_4", "bulk Gbit/s, 4 streams", True, 2),
    Metric("rr_p50_us", "RR p50 µs @1k rps", False),
    Metric("rr_p90_us", "RR p90 µs @1k rps", False),
    Metric("rr_p99_us", "RR p99 µs @1k rps", False),
    Metric("crr_per_s", "new connections/s", True),
    Metric("cpu_s_per_gb", "proxy CPU s per GB", False, 2),
    Metric("cpu_s_per_1k_req", "proxy CPU s per 1k req", False, 3),
    Metric("rss_kb_idle", "proxy RSS KB, idle", False, 0),
    Metric("rss_kb_1k_conns", "proxy RSS KB, 1k conns", False, 0),
)
METRIC_KEYS = tuple(m.key for m in METRICS)
# Figures measured alongside, in the JSON but not in the list of ten.
EXTRA_KEYS = ("rr_rate", "crr_p50_us", "crr_p99_us", "vcpu_at_1k_rps")
# The redirect modes compared: eBPF against iptables, on these figures.
REDIRECT_PAIR = ("trellis-ebpf", "trellis")
REDIRECT_KEYS = ("crr_per_s", "rr_p50_us", "rr_p99_us")
ZTUNNEL_VCPU_AT_1K_RPS = 0.06  # published by Istio, per node proxy
ZTUNNEL_RSS_MB = 12


def summarize_runs(runs: Runs) -> dict[str, dict[str, Summary | None]]:
    return {name: {key: summarize([r.get(key) for r in reps])
                   for key in (*METRIC_KEYS, *EXTRA_KEYS)}
            for name, reps in runs.items()}


def results_document(runs: Runs, meta: Mapping[str, Any]) -> dict[str, Any]:
    """What bench/results/<timestamp>.json holds; other tools read ``scenarios``."""
    summaries = summarize_runs(runs)
    scenarios = {name: {key: (s.to_json() if s else None) for key, s in figures.items()}
                 for name, figures in summaries.items()}
    return {"scenarios": scenarios, "targets": [t.to_json() for t in target_checks(summaries)],
            "ebpf_vs_iptables": redirect_ratios(summaries),
            "runs": {name: [dict(r) for r in reps] for name, reps in runs.items()},
            "meta": dict(meta)}


def ratio(value: Summary | None, reference: Summary | None) -> float | None:
    if value is None or reference is None or reference.median == 0:
        return None
    return value.median / reference.median


def _number(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render_table(summaries: Summaries) -> str:
    """One block per figure, one row per scenario: median [min … max], then the median
    over that of direct, of envoy and of trellis (on the trellis-ebpf row: eBPF / iptables)."""
    names = list(summaries)
    references = ("direct", "envoy", "trellis")
    header = ("figure", "scenario", "median", "min … max", *(f"/{r}" for r in references))
    rows: list[tuple[str, ...]] = []
    for metric in METRICS:
        for i, name in enumerate(names):
            s = summaries[name].get(metric.key)
            spread = (f"{_number(s.min, metric.digits)} … {_number(s.max, metric.digits)}"
                      if s else "-")
            rows.append((metric.label if i == 0 else "", name,
                         _number(s.median if s else None, metric.digits), spread,
                         *(_ratio_text(ratio(s, summaries.get(r, {}).get(metric.key)))
                           for r in references)))
    widths = [max(len(r[c]) for r in (header, *rows)) for c in range(len(header))]
    lines = [_line(header, widths), _line(tuple("-" * w for w in widths), widths)]
    lines += [_line(r, widths) for r in rows]
    return "\n".join(lines)


def _line(cells: tuple[str, ...], widths: Sequence[int]) -> str:
    left = {0, 1}  # labels left-aligned, numbers right-aligned
    return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()


@dataclass(frozen=True)
class TargetCheck:
    measure: str
    value: float | None  # the Trellis / Envoy ratio (or added-latency ratio)
    target: str
    met: bool | None  # None: not measurable in this run

    def to_json(self) -> dict[str, Any]:
        return {"measure": self.measure, "value": self.value, "target": self.target,
                "met": self.met}


def target_checks(summaries: Summaries) -> list[TargetCheck]:
    """The issue's Trellis / Envoy targets, from the medians of one run."""
    trellis, envoy = summaries.get("trellis", {}), summaries.get("envoy", {})
    direct, stunnel = summaries.get("direct", {}), summaries.get("stunnel", {})

    def med(figures: Mapping[str, Summary | None], key: str) -> float | None:
        s = figures.get(key)
        return s.median if s else None

    def over(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    def added(key: str) -> float | None:
        base = med(direct, key)
        t, e = med(trellis, key), med(envoy, key)
        if base is None or t is None or e is None or e <= base:
            return None  # Envoy added nothing measurable: no ratio to speak of
        return max(0.0, t - base) / (e - base)

    def check(measure: str, value: float | None, target: str, at_least: bool) -> TargetCheck:
        met = None if value is None else (value >= 1.0 if at_least else value <= 1.0)
        return TargetCheck(measure, value, target, met)

    checks = [
        check("bulk Gbit/s (1 stream)", over(med(trellis, "bulk_gbps_1"),
                                             med(envoy, "bulk_gbps_1")), ">= 1.0", True),
        check("bulk Gbit/s (4 streams)", over(med(trellis, "bulk_gbps_4"),
                                              med(envoy, "bulk_gbps_4")), ">= 1.0", True),
        check("p50 added over direct", added("rr_p50_us"), "<= 1.0", False),
        check("p99 added over direct", added("rr_p99_us"), "<= 1.0", False),
        check("new connections/s", over(med(trellis, "crr_per_s"), med(envoy, "crr_per_s")),
              ">= 1.0", True),
        check("CPU per 1k requests", over(med(trellis, "cpu_s_per_1k_req"),
                                          med(envoy, "cpu_s_per_1k_req")), "<= 1.0", False),
        check("RSS with 1k connections", over(med(trellis, "rss_kb_1k_conns"),
                                              med(envoy, "rss_kb_1k_conns")), "<= 1.0", False),
    ]
    vs_stunnel = over(med(trellis, "crr_per_s"), med(stunnel, "crr_per_s"))
    checks.append(TargetCheck("new connections/s vs stunnel", vs_stunnel, ">= 5.0",
                              None if vs_stunnel is None else vs_stunnel >= 5.0))
    return checks


def render_targets(checks: Sequence[TargetCheck]) -> str:
    lines = ["targets (trellis / envoy unless stated):"]
    for c in checks:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[c.met]
        value = "-" if c.value is None else f"{c.value:.2f}"
        lines.append(f"  {c.measure:<30} {value:>6}  target {c.target:<7} {verdict}")
    return "\n".join(lines)


def render_ztunnel(summaries: Summaries, proxies: int = 2) -> str:
    """Our vCPU and RSS per node proxy at 1,000 rps, beside ztunnel's published figure."""
    trellis = summaries.get("trellis", {})
    vcpu, rss = trellis.get("vcpu_at_1k_rps"), trellis.get("rss_kb_idle")
    ours_cpu = "-" if vcpu is None else f"{vcpu.median / proxies:.3f}"
    ours_rss = "-" if rss is None else f"{rss.median / proxies / 1024:.0f}"
    return (f"per node proxy at 1,000 rps: trellis {ours_cpu} vCPU, {ours_rss} MB RSS (idle); "
            f"ztunnel (published) ~{ZTUNNEL_VCPU_AT_1K_RPS} vCPU, ~{ZTUNNEL_RSS_MB} MB")


def redirect_ratios(summaries: Summaries) -> dict[str, float | None]:
    """trellis-ebpf's median over trellis's for each of REDIRECT_KEYS (None: not both ran)."""
    ebpf, iptables = (summaries.get(name, {}) for name in REDIRECT_PAIR)
    return {key: ratio(ebpf.get(key), iptables.get(key)) for key in REDIRECT_KEYS}


def render_redirect(summaries: Summaries) -> str:
    """The eBPF / iptables line: connection set-up rate and request latency, explicitly."""
    ebpf, iptables = (summaries.get(name, {}) for name in REDIRECT_PAIR)
    labels = {m.key: m for m in METRICS}
    parts = []
    for key, value in redirect_ratios(summaries).items():
        metric, e, i = labels[key], ebpf.get(key), iptables.get(key)
        better = "higher" if metric.higher_is_better else "lower"
        detail = (f"{_number(e.median, metric.digits)} vs {_number(i.median, metric.digits)}; "
                  f"{better} is better" if e and i and value is not None
                  else "not measured: needs trellis and trellis-ebpf in the run")
        parts.append(f"  {metric.label:<22} {_ratio_text(value):>6}  ({detail})")
    return "\n".join(["eBPF / iptables redirect (trellis-ebpf / trellis, medians):", *parts])
