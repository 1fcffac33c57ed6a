"""``trellis policy check``: decide one connection against policy files.

    trellis policy check -f policies/ \\
        --source-principal spiffe://cluster.local/ns/demo/sa/frontend --source-ip 10.0.1.5 \\
        --dest-namespace demo --dest-labels app=backend \\
        --dest-ip 10.0.2.7 --dest-port 8080 [--json]

Documents with errors are reported on stderr, each error naming the policy
and the field. An invalid policy is decided as a node proxy that never saw a
valid version of it decides: it fails closed for the workloads it selects (an
ALLOW matches nothing, a DENY denies everything; ``policy/failclosed.py``),
and the decision's reason is then ``invalid_policy``. The rest are evaluated
as written, and the exit status is 0 whenever a decision was made. A mistake
in the command line itself is one ``trellis: error: ...`` line and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from identity.spiffe import Identity, InvalidIdentity
from policy.evaluate import evaluate
from policy.facts import ConnectionFacts, Decision
from policy.failclosed import InvalidPolicy
from policy.index import PolicyIndex
from policy.loader import DEFAULT_ROOT_NAMESPACE
from policy.matchers import parse_address, parse_port
from policy.model import Action
from policy.sources import load_yaml

_SUFFIXES = (".yaml", ".yml")


class UsageError(Exception):
    """A mistake on the command line; the message is shown as is."""


def register(subparsers: Any) -> None:
    group = subparsers.add_parser("policy", help="AuthorizationPolicy tools")
    commands = group.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check", help="decide one connection against AuthorizationPolicy files",
        description="Load AuthorizationPolicy documents and decide one connection as the "
                    "destination's node proxy would.")
    check.add_argument("-f", "--file", dest="files", action="append", metavar="FILE_OR_DIR",
                       help="a YAML file, or a directory of *.yaml/*.yml (repeatable)")
    check.add_argument("--source-principal", metavar="SPIFFE_ID",
                       help="the peer's SPIFFE ID; omit for a plaintext peer")
    check.add_argument("--source-ip", metavar="IP")
    check.add_argument("--source-namespace", metavar="NS",
                       help="must agree with the principal: policy reads it from the identity")
    check.add_argument("--dest-namespace", metavar="NS")
    check.add_argument("--dest-labels", metavar="K=V,...", default="")
    check.add_argument("--dest-ip", metavar="IP")
    check.add_argument("--dest-port", metavar="PORT")
    check.add_argument("--root-namespace", metavar="NS", default=DEFAULT_ROOT_NAMESPACE,
                       help=f"the namespace whose policies apply mesh-wide "
                            f"(default {DEFAULT_ROOT_NAMESPACE})")
    check.add_argument("--json", action="store_true", help="print the decision as JSON")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    notes: list[str] = []
    try:
        facts = _facts(args, notes)
        sources = _read_sources(args.files or [])
    except UsageError as exc:
        print(f"trellis: error: {exc}", file=sys.stderr)
        return 2
    loaded = load_yaml(sources, root_namespace=args.root_namespace)
    invalid = [f"{p.key}: {_fallback(p)}" for p in loaded.invalid]
    for problem in [*map(str, loaded.errors), *invalid]:
        print(f"trellis: error: {problem}", file=sys.stderr)
    decision = evaluate(facts, PolicyIndex.build(loaded.enforced()))
    warnings = [*notes, *(str(w) for w in loaded.warnings)]
    if args.json:
        warnings += [f"error: {e}" for e in [*map(str, loaded.errors), *invalid]]
        print(json.dumps(_as_json(decision, warnings)))
    else:
        print(_as_text(decision, warnings))
    return 0


def _fallback(invalid: InvalidPolicy) -> str:
    stand_in = invalid.stand_in
    if stand_in is None:
        return ("invalid, and not enforced (its valid form would not be enforced by the node "
                "proxy either)")
    scope = "every namespace" if stand_in.mesh_wide else f"namespace {stand_in.namespace}"
    selected = ("every workload" if stand_in.selector is None else "workloads with "
                + ",".join(f"{k}={v}" for k, v in stand_in.selector))
    effect = ("an ALLOW that matches nothing" if stand_in.action is Action.ALLOW
              else "a DENY of every connection")
    return (f"invalid, so it fails closed: {effect}, for {selected} in {scope} (a node "
            f"proxy that saw a valid version keeps enforcing that one instead)")


def _as_json(decision: Decision, warnings: list[str]) -> dict[str, object]:
    return {"decision": "ALLOW" if decision.allowed else "DENY",
            "reason": str(decision.reason), "policy": decision.policy,
            "rule": decision.rule, "audit": list(decision.audit), "warnings": warnings}


def _as_text(decision: Decision, warnings: list[str]) -> str:
    lines = [f"decision: {'ALLOW' if decision.allowed else 'DENY'}",
             f"reason:   {decision.reason}",
             f"policy:   {decision.policy or '-'}",
             f"rule:     {'-' if decision.rule is None else decision.rule}"]
    if decision.audit:
        lines.append(f"audit:    {', '.join(decision.audit)}")
    lines += [f"warning:  {w}" for w in warnings]
    return "\n".join(lines)


def _facts(args: argparse.Namespace, notes: list[str]) -> ConnectionFacts:
    principal = args.source_principal
    identity = None
    if principal is not None:
        try:
            identity = Identity.parse(principal)
        except InvalidIdentity as exc:
            raise UsageError(f"--source-principal: {exc}") from None
    source_namespace = args.source_namespace
    if identity is not None and source_namespace not in (None, identity.namespace):
        raise UsageError(f"--source-namespace {source_namespace!r} disagrees with the "
                         f"principal's namespace {identity.namespace!r}; policy takes the "
                         f"namespace from the peer identity")
    if identity is None and source_namespace is not None:
        notes.append(f"--source-namespace {source_namespace!r} does not count for a plaintext "
                     f"peer: policy takes the namespace from the peer identity")
    port = parse_port(_required(args.dest_port, "--dest-port"))
    if port is None:
        raise UsageError(f"--dest-port: {args.dest_port!r} is not a port (0-65535)")
    return ConnectionFacts(
        source_principal=None if identity is None else identity.uri,
        source_ip=_address(args.source_ip, "--source-ip"),
        source_namespace=source_namespace if identity is not None else None,
        dest_namespace=_required(args.dest_namespace, "--dest-namespace"),
        dest_labels=_labels(args.dest_labels),
        dest_ip=_address(args.dest_ip, "--dest-ip"),
        dest_port=port,
    )


def _required(value: str | None, option: str) -> str:
    if not value:
        raise UsageError(f"{option} is required")
    return value


def _address(value: str | None, option: str) -> str:
    text = _required(value, option)
    try:
        return str(parse_address(text))
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not an IP address") from None


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--dest-labels: {pair!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def _read_sources(paths: list[str]) -> list[tuple[str, str]]:
    """(name, text) of every file named, or found directly in a directory named."""
    if not paths:
        raise UsageError("-f FILE_OR_DIR is required")
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES and p.is_file())
            if not found:
                raise UsageError(f"-f {name}: no *.yaml or *.yml files in this directory")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"-f {name}: no such file or directory")
    return [(str(p), _read(p)) for p in files]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"-f {path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"-f {path}: not UTF-8 text") from None
