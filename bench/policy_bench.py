"""Authorization decision rate with 10 and with 10,000 policies, and the cost of an update.

    python -m bench.policy_bench [--json] [--seconds 0.3]

Both meshes have ten policies per namespace (one namespace, then 1,000), so a
destination workload sees the same policies in both: the rates must be within
2x of each other, because a decision may only cost what applies to the
destination, never what the mesh holds. The exit status is 1 when they are
not. What gap remains is memory locality, not lookup work: connections to
1,000 namespaces touch 1,000 namespaces' policies, which do not all stay in
the CPU caches as one namespace's ten do.

Updates are timed on the 10,000-policy index: add one, change one, remove
one, and replacing the whole set for comparison.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from policy import ConnectionFacts, Policy, PolicyIndex, evaluate, load_policies
from policy.loader import Document

PER_NAMESPACE = 10
SERVICES = 8  # selector policies per namespace; the other two are namespace-wide
MAX_RATIO = 2.0


def namespace_policies(ns: str) -> list[dict[str, Any]]:
    """Ten realistic policies: a namespace DENY, a namespace ALLOW, eight per service."""
    def doc(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": ns}, "spec": spec}
    docs = [doc("deny-legacy", {"action": "DENY", "rules": [
                {"from": [{"source": {"namespaces": ["legacy-*"]}}]}]}),
            doc("allow-same-namespace", {"rules": [
                {"from": [{"source": {"namespaces": [ns]}}], "to": [{"operation": {
                    "ports": ["9090"]}}]}]})]
    for k in range(SERVICES):
        source = {"principals": [f"cluster.local/ns/{ns}/sa/client-{k}",
                                 "cluster.local/ns/gateway/sa/*"],
                  "ipBlocks": ["10.0.0.0/8"]}
        docs.append(doc(f"allow-svc-{k}", {
            "selector": {"matchLabels": {"app": f"svc-{k}"}},
            "rules": [{"from": [{"source": source}],
                       "to": [{"operation": {"ports": ["8080", "8443"]}}]}]}))
    return docs


def build(namespaces: int) -> list[Policy]:
    docs = [Document(d, "bench") for n in range(namespaces) for d in namespace_policies(f"ns-{n}")]
    result = load_policies(docs)
    assert not result.errors and len(result.policies) == namespaces * PER_NAMESPACE
    return list(result.policies)


def connections(namespaces: int, count: int, rng: random.Random) -> list[ConnectionFacts]:
    """A mix that exercises DENY, ALLOW and no-match paths."""
    result = []
    for _ in range(count):
        ns, k = f"ns-{rng.randrange(namespaces)}", rng.randrange(SERVICES)
        source_ns = rng.choice([ns, "gateway", "legacy-1", "other"])
        client = rng.choice([f"client-{k}", "client-x"])
        result.append(ConnectionFacts(
            source_principal=f"spiffe://cluster.local/ns/{source_ns}/sa/{client}",
            source_ip=f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            source_namespace=source_ns, dest_namespace=ns, dest_labels={"app": f"svc-{k}"},
            dest_ip="10.1.2.3", dest_port=rng.choice([8080, 9090, 22])))
    return result


def rate(index: PolicyIndex, sample: Sequence[ConnectionFacts], seconds: float) -> float:
    """Decisions per second: repeated passes over ``sample`` for about ``seconds``."""
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for facts in sample:
            evaluate(facts, index)
        done += len(sample)
    return done / elapsed


def per_call(action: Callable[[int], object], times: int) -> float:
    """Mean seconds per call of ``action(i)``."""
    start = time.perf_counter()
    for i in range(times):
        action(i)
    return (time.perf_counter() - start) / times


def run(seconds: float) -> dict[str, Any]:
    rng = random.Random(7)
    small, large = build(1), build(1000)
    indexes = {10: PolicyIndex.build(small), 10_000: PolicyIndex.build(large)}
    samples = {10: connections(1, 2000, rng), 10_000: connections(1000, 2000, rng)}
    best = {size: 0.0 for size in indexes}
    for _ in range(3):  # interleaved, best of three, so both see the same machine
        for size, index in indexes.items():
            best[size] = max(best[size], rate(index, samples[size], seconds))
    big = indexes[10_000]
    extra = [p for p in build(1) if p.name.startswith("allow-svc")]
    added = [Policy(f"ns-{i % 1000}", f"new-{i}", p.action, p.rules, p.selector)
             for i, p in enumerate(extra * 25)]
    changed = [Policy(p.namespace, p.name, p.action, (), p.selector) for p in large[:200]]
    updates = {
        "add one policy": per_call(lambda i: big.with_policy(added[i]), len(added)),
        "change one policy": per_call(lambda i: big.with_policy(changed[i]), len(changed)),
        "remove one policy": per_call(
            lambda i: big.without_policy(large[i].namespace, large[i].name), 200),
        "replace all 10,000": per_call(lambda i: PolicyIndex.build(large), 3),
    }
    ratio = max(best.values()) / min(best.values())
    return {"decisions_per_second": {str(k): round(v) for k, v in best.items()},
            "ratio": round(ratio, 3), "within_2x": ratio <= MAX_RATIO,
            "update_microseconds": {k: round(v * 1e6, 1) for k, v in updates.items()}}


def table(result: dict[str, Any]) -> str:
    rates = result["decisions_per_second"]
    lines = ["policy decisions (evaluate per connection)",
             f"  {'policies':>9}  {'namespaces':>10}  {'decisions/s':>12}  {'µs/decision':>11}"]
    for size, namespaces in (("10", 1), ("10000", 1000)):
        lines.append(f"  {int(size):>9,}  {namespaces:>10,}  {rates[size]:>12,}  "
                     f"{1e6 / rates[size]:>11.2f}")
    verdict = "ok" if result["within_2x"] else "FAIL: must be within 2x"
    lines += [f"  ratio (faster / slower): {result['ratio']:.2f}  {verdict}",
              "index updates with 10,000 policies"]
    lines += [f"  {name:<20} {us:>10,.1f} µs" for name, us in result["update_microseconds"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--seconds", type=float, default=0.3,
                        help="time per decision-rate measurement (default 0.3; 6 are taken)")
    args = parser.parse_args(argv)
    result = run(args.seconds)
    print(json.dumps(result) if args.json else table(result))
    return 0 if result["within_2x"] else 1


if __name__ == "__main__":
    sys.exit(main())
