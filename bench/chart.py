"""The results as a PNG: one panel per figure, one bar per scenario (the median),
with a line from min to max. matplotlib is the optional extra ``bench``; without
it the bench still writes the table and the JSON and says the chart is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from bench.report import METRICS
from bench.stats import Summary

COLOURS = {"direct": "#888888", "trellis": "#2a7ab0", "trellis-ebpf": "#7bb8e0",
           "envoy": "#d9822b", "stunnel": "#5aa05a"}


def write_chart(summaries: Mapping[str, Mapping[str, Summary | None]], path: Path) -> Path | None:
    """Write the chart to ``path``; None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    names = list(summaries)
    fig, axes = plt.subplots(2, 5, figsize=(20, 7.5))
    for ax, metric in zip(axes.flat, METRICS, strict=True):
        values = [summaries[n].get(metric.key) for n in names]
        medians = [v.median if v else 0.0 for v in values]
        low = [v.median - v.min if v else 0.0 for v in values]
        high = [v.max - v.median if v else 0.0 for v in values]
        ax.bar(names, medians, yerr=[low, high], capsize=3,
               color=[COLOURS.get(n, "#999999") for n in names])
        better = "higher" if metric.higher_is_better else "lower"
        ax.set_title(f"{metric.label}\n({better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=30)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle("Trellis benchmark: medians, bars span min … max over repetitions")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
