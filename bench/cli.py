"""`trellis bench …`: the mesh benchmark against its peers, and the policy benchmark.

    trellis bench [--quick] [--repetitions N]
                  [--scenarios direct,trellis,trellis-ebpf,envoy,stunnel]
    trellis bench policy [--json] [--seconds S]
    trellis bench soak [--connections 10000]

The mesh benchmark runs every scenario on the namespace lab in one run (the
lab named by $TRELLIS_LAB_DIR / $TRELLIS_LAB_NETNS_PREFIX; brought up and
taken down again when none is up; the mesh's other redirect mode runs in a
second lab of the bench's own, bench/labsetup.py), prints the table with
ratios to ``direct``, ``envoy`` and ``trellis`` and the eBPF / iptables line,
and writes bench/results/<timestamp>.json and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench import policy_bench, report, runner, soak_bench
from lab.errors import LabError
from lab.state import LabDir

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = subparsers.add_parser(
        "bench", help="benchmark the mesh against no mesh, Envoy and stunnel",
        description="Benchmark Trellis (iptables and eBPF redirect) against no mesh "
                    "(direct), an Envoy HBONE pair and an stunnel mTLS pair on the "
                    "namespace lab, in one run.")
    bench.add_argument("--quick", action="store_true",
                       help="one repetition of short workloads (under 3 minutes)")
    bench.add_argument("--repetitions", type=int, default=None,
                       help="repetitions of every scenario (default 3; 1 with --quick)")
    bench.add_argument("--scenarios", default=",".join(runner.SCENARIOS),
                       help="comma-separated subset of " + ", ".join(runner.SCENARIOS))
    bench.add_argument("--results-dir", default=str(RESULTS_DIR),
                       help="where <timestamp>.json and .png go (default: bench/results)")
    bench.add_argument("--keep-lab", action="store_true",
                       help="leave up the labs the bench brought up itself (a lab that "
                            "was already up always stays)")
    bench.set_defaults(func=_run)
    commands = bench.add_subparsers(dest="bench_command", metavar="COMMAND")
    policy = commands.add_parser("policy", help="authorization decision rate (no lab needed)",
                                 description=policy_bench.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    policy.add_argument("--json", action="store_true", help="print the figures as JSON")
    policy.add_argument("--seconds", default="0.3", help="time per measured rate")
    policy.set_defaults(func=lambda args: policy_bench.main(
        ["--seconds", args.seconds, *(["--json"] if args.json else [])]))
    soak = commands.add_parser("soak", help="hold many connections through the mesh at once: "
                                            "proxy RSS and fds per connection, and back",
                               description=soak_bench.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    soak.add_argument("--connections", type=int, default=soak_bench.DEFAULT_CONNECTIONS,
                      help="connections held at once, both directions together "
                           f"(default {soak_bench.DEFAULT_CONNECTIONS})")
    soak.add_argument("--results-dir", default=str(RESULTS_DIR),
                      help="where soak-<timestamp>.json goes (default: bench/results)")
    soak.add_argument("--keep-lab", action="store_true",
                      help="leave up a lab the bench brought up itself")
    soak.set_defaults(func=_soak)


def settings_from(args: argparse.Namespace) -> runner.Settings:
    """The run's settings; a bad option is a LabError naming it."""
    names = tuple(n.strip() for n in args.scenarios.split(",") if n.strip())
    unknown = [n for n in names if n not in runner.SCENARIOS]
    if unknown or not names:
        raise LabError(f"--scenarios: unknown {', '.join(unknown) or '(empty)'}; choose from "
                       + ", ".join(runner.SCENARIOS))
    repetitions = args.repetitions if args.repetitions is not None else (1 if args.quick else 3)
    if not 1 <= repetitions <= 50:
        raise LabError(f"--repetitions: {repetitions} is outside 1..50")
    ordered = tuple(n for n in runner.SCENARIOS if n in names)
    return runner.Settings(ordered, repetitions, runner.QUICK if args.quick else runner.FULL,
                           Path(args.results_dir), args.keep_lab)


def _run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
        if os.geteuid() != 0:
            raise LabError("`trellis bench` needs root (it runs in the lab's namespaces)")
        begin = time.monotonic()
        outcome = runner.run(settings, LabDir.from_env(), lambda line: print(line, flush=True))
    except (LabError, RuntimeError) as exc:
        print(f"trellis: error: {exc}", file=sys.stderr)
        return 2
    summaries = report.summarize_runs(outcome.document["runs"])  # type: ignore[arg-type]
    print()
    print(report.render_table(summaries))
    print()
    print(report.render_redirect(summaries))
    print()
    print(report.render_targets(report.target_checks(summaries)))
    print(report.render_ztunnel(summaries))
    print(f"\nresults: {outcome.json_path}")
    print(f"chart:   {outcome.chart_path or 'not written (pip install .[bench] for matplotlib)'}")
    print(f"took {time.monotonic() - begin:.0f} s")
    return 0


def _soak(args: argparse.Namespace) -> int:
    try:
        if not 2 <= args.connections <= 50_000:
            raise LabError(f"--connections: {args.connections} is outside 2..50000")
        if os.geteuid() != 0:
            raise LabError("`trellis bench soak` needs root (it runs in the lab's namespaces)")
        report, path = soak_bench.run(LabDir.from_env(), args.connections,
                                      Path(args.results_dir), args.keep_lab,
                                      lambda line: print(line, flush=True))
    except (LabError, RuntimeError) as exc:
        print(f"trellis: error: {exc}", file=sys.stderr)
        return 2
    print(f"results: {path}")
    ok = report.memory_reused() and all(
        r.failed == 0 and r.opened == report.connections and r.fds_back for r in report.rounds)
    return 0 if ok else 1
