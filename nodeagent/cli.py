"""`trellis agent run` and `trellis ca serve`: the long-running processes of a node.

The CA command lives here rather than in identity/ because the CA needs a
workload source to know which identities run on which node, and sources belong
to the node agent; identity/ stays free of any discovery code.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from datetime import timedelta
from pathlib import Path

from tunnel.config import ConfigError

_log = logging.getLogger("trellis.cli")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    agent = subparsers.add_parser("agent", help="the per-node agent and proxy")
    agent_sub = agent.add_subparsers(dest="agent_command", metavar="COMMAND", required=True)
    run = agent_sub.add_parser("run", help="run the node agent (and its proxy) in this namespace")
    run.add_argument("--node", required=True, help="this node's name (spec.nodeName of its pods)")
    run.add_argument("--workloads", required=True, type=Path,
                     help="YAML file of Kubernetes-style Pods, Namespaces, Services")
    run.add_argument("--ca-url", required=True, help="https://HOST:PORT of the CA")
    run.add_argument("--ca-root", required=True, type=Path, help="the CA's root certificate")
    run.add_argument("--token-file", required=True, type=Path, help="this node's credential")
    run.add_argument("--trust-domain", default="cluster.local")
    run.add_argument("--metrics", default="127.0.0.1:15020", help="HOST:PORT for /metrics")
    run.add_argument("--readiness", default="0.0.0.0:15021", help="HOST:PORT for /healthz/ready")
    run.add_argument("--redirect", default="iptables", help="redirection mode: iptables")
    run.add_argument("--root-namespace", default="trellis-system",
                     help="policies in this namespace apply mesh-wide")
    run.add_argument("--log-level", default="info")
    run.set_defaults(func=_agent_run)

    ca = subparsers.add_parser("ca", help="the workload certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)
    serve = ca_sub.add_parser("serve", help="serve the CA's HTTPS API")
    serve.add_argument("--state-dir", required=True, type=Path, help="holds the root key")
    serve.add_argument("--listen", default="127.0.0.1:15012", help="HOST:PORT")
    serve.add_argument("--workloads", required=True, type=Path,
                       help="YAML workloads file: which identities run on which node")
    serve.add_argument("--node-tokens", required=True, type=Path,
                       help="JSON map of node name to sha256 of its token")
    serve.add_argument("--trust-domain", default="cluster.local")
    serve.add_argument("--cert-lifetime", default="24h", help="e.g. 24h, 30m, 90s")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_ca_serve)


def parse_duration(value: str, setting: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = value[:-1], value[-1:]
    if unit not in units or not number.isdigit() or int(number) == 0:
        raise ConfigError(f"{setting}: {value!r} is not a duration like 24h, 30m or 90s")
    return timedelta(seconds=int(number) * units[unit])


def _fail(message: str) -> int:
    print(f"trellis: error: {message}", file=sys.stderr)
    return 2


def _agent_run(args: argparse.Namespace) -> int:
    from nodeagent.config import AgentConfig, parse_hostport
    from nodeagent.run import run_agent
    from tunnel.config import ProxyConfig

    try:
        config = AgentConfig(
            proxy=ProxyConfig(node=args.node, trust_domain=args.trust_domain),
            workloads_file=args.workloads, ca_url=args.ca_url, ca_root=args.ca_root,
            token_file=args.token_file,
            metrics_address=parse_hostport(args.metrics, "--metrics"),
            readiness_address=parse_hostport(args.readiness, "--readiness"),
            redirect=args.redirect, root_namespace=args.root_namespace)
    except ConfigError as exc:
        return _fail(str(exc))
    logging.getLogger().setLevel(args.log_level.upper())
    return _run(run_agent(config))


def _ca_serve(args: argparse.Namespace) -> int:
    from nodeagent.config import parse_hostport

    try:
        host, port = parse_hostport(args.listen, "--listen")
        lifetime = parse_duration(args.cert_lifetime, "--cert-lifetime")
    except ConfigError as exc:
        return _fail(str(exc))
    logging.getLogger().setLevel(args.log_level.upper())
    return _run(_serve_ca(args, host, port, lifetime))


async def _serve_ca(args: argparse.Namespace, host: str, port: int, lifetime: timedelta) -> None:
    from identity.ca import CertificateAuthority
    from identity.ca_server import CaServerConfig, serve_ca
    from identity.node_auth import StaticTokenAuthenticator
    from nodeagent.ca_registry import SnapshotRegistry
    from nodeagent.source_file import FileSource
    from tunnel import tasks

    ca = CertificateAuthority.load_or_create(args.state_dir, args.trust_domain)
    authenticator = StaticTokenAuthenticator.from_file(args.node_tokens)
    registry = SnapshotRegistry()
    source = FileSource(args.workloads, node="", trust_domain=args.trust_domain)
    snapshots = source.snapshots()
    registry.update(await anext(snapshots))

    async def follow() -> None:
        async for snapshot in snapshots:
            registry.update(snapshot)

    tasks.spawn(follow(), name="ca workload source")
    server = await serve_ca(
        CaServerConfig(host=host, port=port, lifetime=lifetime, trust_domain=args.trust_domain),
        ca, registry, authenticator)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _log.info("ca serving", extra={"fields": {"listen": f"{host}:{port}",
                                              "trust_domain": args.trust_domain}})
    await stop.wait()
    server.close()


def _run(main) -> int:  # type: ignore[no-untyped-def]
    import uvloop

    try:
        uvloop.run(main)
    except ConfigError as exc:
        return _fail(str(exc))
    except OSError as exc:
        # A port already in use, a namespace that vanished: one line, no traceback.
        return _fail(str(exc))
    return 0
