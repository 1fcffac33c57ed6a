"""`trellis agent run`, `trellis proxy run` and `trellis ca serve`: a node's long-running processes.

The CA command lives here rather than in identity/ because the CA needs a
workload source to know which identities run on which node, and sources belong
to the node agent; identity/ stays free of any discovery code.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from datetime import timedelta
from pathlib import Path

from tunnel.config import ConfigError, ProxyConfig

_log = logging.getLogger("trellis.cli")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    agent = subparsers.add_parser("agent", help="the per-node agent (and, alone, its proxy)")
    agent_sub = agent.add_subparsers(dest="agent_command", metavar="COMMAND", required=True)
    run = agent_sub.add_parser(
        "run", help="run the node agent in this namespace: with --control-socket it drives "
                    "a `trellis proxy run` process, else it runs the proxy itself")
    _node_arguments(run, ca_required=False)
    run.add_argument("--control-socket", type=Path, default=None,
                     help="drive the node proxy listening on this unix socket "
                          "(`trellis proxy run`); without it the agent runs the proxy")
    run.add_argument("--redirect", default="iptables", choices=("iptables", "ebpf"),
                     help="redirection mode inside pods")
    run.add_argument("--redirect-fallback", default="", choices=("", "iptables"),
                     help="with --redirect ebpf on a host that cannot do eBPF: fall back "
                          "to this mode instead of stopping")
    run.add_argument("--bpf-root", default="",
                     help="bpffs directory for eBPF mode's pins "
                          "(default /sys/fs/bpf/trellis/NODE)")
    run.add_argument("--cni-socket", type=Path, default=None,
                     help="serve the trellis-cni plugin on this unix socket")
    run.add_argument("--drain-seconds", type=float, default=0.0,
                     help="running the proxy itself: on SIGTERM, wait up to this long "
                          "for live connections to end")
    run.add_argument("--host-netns", default="/proc/self/ns/net",
                     help="the node's network namespace, where kubelet probes to enrolled "
                          "pods are SNATed to 169.254.7.127 (default: the agent's own; "
                          "'' for none)")
    run.set_defaults(func=_agent_run)

    proxy = subparsers.add_parser("proxy", help="the node proxy (ztunnel's part)")
    proxy_sub = proxy.add_subparsers(dest="proxy_command", metavar="COMMAND", required=True)
    prun = proxy_sub.add_parser(
        "run", help="run the node proxy; it serves the pods a node agent hands it over "
                    "--control-socket, and keeps serving them while the agent restarts")
    _node_arguments(prun, ca_required=True)
    prun.add_argument("--control-socket", type=Path, required=True,
                      help="unix socket the node agent connects to")
    prun.add_argument("--drain-seconds", type=float, default=0.0,
                      help="on SIGTERM, wait up to this long for live connections to end")
    prun.set_defaults(func=_proxy_run)

    ca = subparsers.add_parser("ca", help="the workload certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)
    serve = ca_sub.add_parser("serve", help="serve the CA's HTTPS API")
    serve.add_argument("--state-dir", required=True, type=Path, help="holds the root key")
    serve.add_argument("--plugin-ca", action="store_true",
                       help="--state-dir is a plug-in CA (Istio's cacerts: ca-cert.pem, "
                            "ca-key.pem, cert-chain.pem, root-cert.pem): sign with that "
                            "intermediate, keep the root's key offline; nothing is created")
    serve.add_argument("--listen", default="127.0.0.1:15012", help="HOST:PORT")
    serve.add_argument("--metrics", default="",
                       help="HOST:PORT of a plain-HTTP listener serving /metrics and nothing "
                            "else, apart from the API port as istiod's 15014 is; '' for none")
    serve.add_argument("--service", default="",
                       help="NAMESPACE/NAME of the CA's Service: clients verify the host "
                            "they dial, so its DNS names (NAME, NAME.NS, NAME.NS.svc, "
                            "NAME.NS.svc.CLUSTER_DOMAIN) go into the serving certificate")
    serve.add_argument("--cluster-domain", default="cluster.local",
                       help="the cluster's DNS domain, for --service")
    serve.add_argument("--source", choices=("file", "kubernetes"), default="file",
                       help="file: --workloads and --node-tokens; kubernetes: pods from the "
                            "API server, node agents authenticated by TokenReview")
    serve.add_argument("--workloads", type=Path, default=None,
                       help="YAML workloads file: which identities run on which node")
    serve.add_argument("--node-tokens", type=Path, default=None,
                       help="JSON map of node name to sha256 of its token")
    _kubernetes_arguments(serve)
    serve.add_argument("--agent-service-account", default="trellis-system/trellis-agent",
                       help="NAMESPACE/NAME of the node agents' service account (kubernetes)")
    serve.add_argument("--token-audience", default="trellis-ca",
                       help="audience of the agents' projected tokens (kubernetes)")
    serve.add_argument("--root-configmap", default="",
                       help="publish the trust bundle to every namespace as this ConfigMap "
                            "(key root-cert.pem), as istiod publishes istio-ca-root-cert "
                            "(kubernetes; '' for none)")
    serve.add_argument("--trust-domain", default="cluster.local")
    serve.add_argument("--cert-lifetime", default="24h", help="e.g. 24h, 30m, 90s")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_ca_serve)

    from nodeagent.cni import cli as cni_cli  # `trellis cni install`

    cni_cli.register(subparsers)


def _node_arguments(parser: argparse.ArgumentParser, *, ca_required: bool) -> None:
    parser.add_argument("--node", required=True,
                        help="this node's name (spec.nodeName of its pods)")
    parser.add_argument("--source", choices=("file", "kubernetes"), default="file",
                        help="where workloads come from: a YAML file, or the API server")
    parser.add_argument("--workloads", type=Path, default=None,
                        help="YAML file of Kubernetes-style Pods, Namespaces, Services "
                             "(required with --source file)")
    _kubernetes_arguments(parser)
    where = "" if ca_required else " (needed unless --control-socket)"
    parser.add_argument("--ca-url", required=ca_required, default="",
                        help=f"https://HOST:PORT of the CA{where}")
    parser.add_argument("--ca-root", required=ca_required, type=Path, default=None,
                        help=f"the CA's root certificate{where}")
    parser.add_argument("--token-file", required=ca_required, type=Path, default=None,
                        help=f"this node's credential{where}")
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--metrics", default="127.0.0.1:15020", help="HOST:PORT for /metrics")
    parser.add_argument("--readiness", default="0.0.0.0:15021",
                        help="HOST:PORT for /healthz/ready")
    parser.add_argument("--root-namespace", default="trellis-system",
                        help="security.trellis.dev policies in this namespace apply "
                             "mesh-wide")
    parser.add_argument("--istio-root-namespace", default="istio-system",
                        help="Istio's root namespace: security.istio.io policies there "
                             "apply mesh-wide, as in Istio")
    parser.add_argument("--istio-coexistence", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="never enroll what Istio ambient manages "
                             "(istio.io/dataplane-mode=ambient on the pod or namespace); "
                             "both meshes use the same ports")
    parser.add_argument("--log-level", default="info")
    _limit_arguments(parser)


# The proxy's limits (issue 10), one flag per ProxyConfig setting of the same name.
LIMIT_SETTINGS: tuple[tuple[str, type, str], ...] = (
    ("max_connections_per_node", int, "connections the proxy handles at once (accepted "
     "on 15001/15006, or CONNECT streams on 15008); beyond, refused and counted"),
    ("max_connections_per_pod", int, "the same, per pod"),
    ("relay_idle_timeout_s", float, "close a relayed connection that moved no byte "
     "either way for this many seconds; 0: never"),
    ("relay_write_high_water_bytes", int, "per relayed socket: buffer at most about this "
     "much for a slow reader before reading the other side pauses"),
    ("max_streams_per_connection", int, "CONNECT streams per HBONE connection: our "
     "SETTINGS_MAX_CONCURRENT_STREAMS, the handlers in flight, the pool's cap"),
    ("hbone_handshake_timeout_s", float, "a TLS handshake on 15008 not done by then is closed"),
    ("max_pending_handshakes_per_listener", int, "unfinished TLS handshakes per pod's 15008; "
     "beyond, the oldest idle one gives way or the newcomer is closed"),
    ("max_pending_handshakes_per_node", int, "the same, for all pods of the node together"),
)


def _limit_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(ProxyConfig)}
    for name, kind, what in LIMIT_SETTINGS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=defaults[name],
                            help=f"{what} (default %(default)s)")


def _kubernetes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="with --source kubernetes: default in-cluster config, "
                             "else $KUBECONFIG or ~/.kube/config")
    parser.add_argument("--k8s-backoff-max", type=float, default=10.0,
                        help="seconds: cap of the retry backoff while the API server "
                             "is unreachable")


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
    from nodeagent.run import run_agent

    return _run_node_process(args, run_agent, role="agent", redirect=args.redirect,
                             bpf_root=args.bpf_root, redirect_fallback=args.redirect_fallback,
                             cni_socket=args.cni_socket, host_netns=args.host_netns)


def _proxy_run(args: argparse.Namespace) -> int:
    from nodeagent.proxy_run import run_proxy

    return _run_node_process(args, run_proxy, role="proxy")


def _run_node_process(args: argparse.Namespace, main, **settings) -> int:  # type: ignore[no-untyped-def]
    from nodeagent.config import AgentConfig, parse_hostport

    try:
        metrics = parse_hostport(args.metrics, "--metrics")
        readiness = parse_hostport(args.readiness, "--readiness")
        limits = {name: getattr(args, name) for name, _, _ in LIMIT_SETTINGS}
        config = AgentConfig(
            proxy=ProxyConfig(node=args.node, trust_domain=args.trust_domain,
                              admin_ports=(metrics[1], readiness[1]), **limits),
            workloads_file=args.workloads, ca_url=args.ca_url, ca_root=args.ca_root,
            token_file=args.token_file, control_socket=args.control_socket,
            metrics_address=metrics, readiness_address=readiness,
            root_namespace=args.root_namespace, drain_s=args.drain_seconds,
            istio_root_namespace=args.istio_root_namespace,
            istio_coexistence=args.istio_coexistence,
            source=args.source, kubeconfig=args.kubeconfig,
            k8s_backoff_max_s=args.k8s_backoff_max, **settings)
    except ConfigError as exc:
        return _fail(str(exc))
    logging.getLogger().setLevel(args.log_level.upper())
    return _run(main(config))


def _ca_serve(args: argparse.Namespace) -> int:
    from nodeagent.config import parse_hostport

    try:
        host, port = parse_hostport(args.listen, "--listen")
        lifetime = parse_duration(args.cert_lifetime, "--cert-lifetime")
        server_names = _service_names(args.service, args.cluster_domain)
        metrics = parse_hostport(args.metrics, "--metrics") if args.metrics else None
        if args.source == "file":
            for flag, value in (("--workloads", args.workloads),
                                ("--node-tokens", args.node_tokens)):
                if value is None:
                    raise ConfigError(f"{flag}: required with --source file")
    except ConfigError as exc:
        return _fail(str(exc))
    logging.getLogger().setLevel(args.log_level.upper())
    return _run(_serve_ca(args, host, port, lifetime, server_names, metrics))


def _service_names(service: str, cluster_domain: str) -> tuple[str, ...]:
    if not service:
        return ()
    from identity.ca import service_dns_names
    from nodeagent.ca_k8s import parse_service_account

    try:
        namespace, name = parse_service_account(service, "--service")
        return service_dns_names(name, namespace, cluster_domain)
    except ValueError as exc:
        raise ConfigError(str(exc) if str(exc).startswith("--") else
                          f"--service/--cluster-domain: {exc}") from None


async def _serve_ca(args: argparse.Namespace, host: str, port: int, lifetime: timedelta,
                    server_names: tuple[str, ...], metrics: tuple[str, int] | None) -> None:
    from identity.ca import CertificateAuthority
    from identity.ca_server import CaServerConfig, serve_ca
    from identity.ca_store import CaStateError
    from identity.node_auth import NodeAuthenticator, StaticTokenAuthenticator
    from nodeagent.ca_k8s import follow_registry

    # On Kubernetes --state-dir is the mounted root-key (or cacerts) Secret.
    try:
        ca = (CertificateAuthority.from_plugin if args.plugin_ca else
              CertificateAuthority.load_or_create)(args.state_dir, args.trust_domain)
    except CaStateError as exc:
        raise ConfigError(str(exc)) from None
    authenticator: NodeAuthenticator
    api = None
    if args.source == "kubernetes":
        registry, authenticator, api = await _kubernetes_ca(args)
    else:
        from nodeagent.source_file import FileSource

        authenticator = StaticTokenAuthenticator.from_file(args.node_tokens)
        registry, _follower = await follow_registry(
            FileSource(args.workloads, node="", trust_domain=args.trust_domain))
    server = await serve_ca(
        CaServerConfig(host=host, port=port, lifetime=lifetime, trust_domain=args.trust_domain,
                       server_names=server_names,
                       metrics_host=metrics[0] if metrics else "127.0.0.1",
                       metrics_port=metrics[1] if metrics else None),
        ca, registry, authenticator)
    if api is not None and args.root_configmap:
        from nodeagent.ca_rootcm import RootPublisher

        RootPublisher(api, ca.root_pem, name=args.root_configmap,
                      registry=server.metrics.registry).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _log.info("ca serving", extra={"fields": {"listen": f"{host}:{port}",
                                              "trust_domain": args.trust_domain}})
    await stop.wait()
    server.close()


async def _kubernetes_ca(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from nodeagent.ca_k8s import kubernetes_ca_inputs, parse_service_account
    from nodeagent.k8s_client import api_client, load_configuration

    try:
        account = parse_service_account(args.agent_service_account, "--agent-service-account")
        configuration = await load_configuration(args.kubeconfig)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    inputs = await kubernetes_ca_inputs(
        lambda: api_client(configuration), trust_domain=args.trust_domain,
        agent_service_account=account, audience=args.token_audience,
        backoff_max_s=args.k8s_backoff_max)
    return inputs.registry, inputs.authenticator, inputs.api


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
