"""The node proxy and what keeps it fed, built once for whichever process runs it.

``trellis agent run`` without a control socket runs this in the agent's own
process; ``trellis proxy run`` runs it alone, driven by an agent over the
control socket. Either way the proxy follows the workload source itself (for
routing, policy and certificates) and serves pods on the node.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from identity.ca_client import request_certificate
from identity.certs import CertBundle
from identity.rotation import CertificateManager
from identity.spiffe import Identity
from identity.trust_bundle import BundleFile, TrustBundleError
from nodeagent.config import AgentConfig
from nodeagent.drain import drain
from nodeagent.istio_coexist import CoexistingSource
from nodeagent.mesh_feed import MeshFeed
from nodeagent.policies import PolicyLoader
from nodeagent.source import WorkloadSource
from nodeagent.sources import workload_source
from tunnel import tasks
from tunnel.balancer import RoundRobin
from tunnel.config import ConfigError
from tunnel.context import ProxyInputs, StateView
from tunnel.identities import TlsIdentities
from tunnel.limits import fds_needed, raise_fd_limit
from tunnel.metrics import ProxyMetrics
from tunnel.pool import HboneConnectionPool
from tunnel.proxy import Proxy

_log = logging.getLogger("trellis.nodeagent")


def _certificate_manager(config: AgentConfig, trust: BundleFile) -> CertificateManager:
    assert config.token_file is not None  # AgentConfig checked
    token_file = config.token_file

    async def fetch(identity: Identity) -> CertBundle:
        # Read per request: on Kubernetes this is a projected service-account
        # token, which the kubelet rotates in place.
        token = token_file.read_text().strip()
        # The bundle in force, not the file as it was at start: after a root
        # rotation the CA serves a certificate from the new root.
        return await request_certificate(ca_url=config.ca_url, ca_root_pem=trust.current.pem,
                                         token=token, identity=identity)

    return CertificateManager(fetch)


@dataclass
class ProxyStack:
    proxy: Proxy
    metrics: ProxyMetrics
    certificates: CertificateManager
    feed: MeshFeed
    trust_watch: asyncio.Task[None] | None = None

    @classmethod
    def build(cls, config: AgentConfig) -> ProxyStack:
        _fit_fd_limit(config)
        metrics = ProxyMetrics()
        assert config.ca_root is not None  # AgentConfig checked
        try:
            trust = BundleFile(config.ca_root, registry=metrics.registry)
        except TrustBundleError as exc:
            raise ConfigError(f"--ca-root: {exc}") from None
        certificates = _certificate_manager(config, trust)
        tls = TlsIdentities(certificates, fetch_timeout=config.cert_fetch_timeout_s,
                            trust=trust.current)
        certificates.subscribe(tls.on_renewed)
        # A root rotation reaches the live contexts without a restart
        # (identity/trust_bundle.py).
        trust_watch = tasks.spawn(trust.follow(tls.on_trust_changed), name="trust bundle")
        pool = HboneConnectionPool(
            idle_timeout=config.proxy.pool_idle_timeout_s,
            max_streams_per_connection=config.proxy.max_streams_per_connection)
        # Read at scrape time, on the loop's thread (the admin server is async).
        metrics.hbone_connections.set_function(pool.connection_count)
        inputs = ProxyInputs(config=config.proxy, state=StateView(), tls=tls, pool=pool,
                             metrics=metrics, balancer=RoundRobin())
        proxy = Proxy(inputs)
        feed = MeshFeed(config.node, proxy, certificates,
                        PolicyLoader(config.root_namespace, config.istio_root_namespace))
        return cls(proxy, metrics, certificates, feed, trust_watch)

    def live_connections(self) -> int:
        return sum(len(p.connections) for p in self.proxy.pods.values())

    async def drain_and_close(self, drain_s: float) -> None:
        # New connections go to a newer proxy bound beside this one (a surge
        # upgrade), or are refused: none is accepted here only to be cut.
        self.proxy.stop_accepting()
        await drain(self.live_connections, drain_s)
        _log.info("proxy stopping: closing listeners, keeping pod redirection")
        await self.proxy.close()
        await self.certificates.stop()
        if self.trust_watch is not None:
            self.trust_watch.cancel()


def _fit_fd_limit(config: AgentConfig) -> None:
    """Give the proxy the fds its node connection limit needs, before any is opened."""
    needed = fds_needed(config.proxy)
    before, after = raise_fd_limit(needed)
    if after != before:
        _log.info("raised RLIMIT_NOFILE for max_connections_per_node", extra={"fields": {
            "needed": needed, "soft_before": before[0], "hard_before": before[1],
            "soft": after[0], "hard": after[1]}})
    # If it is still short, the proxy lowers its node limit to fit and says so.


async def open_source(config: AgentConfig,
                      registry: CollectorRegistry | None = None) -> WorkloadSource:
    """The workload source; beside Istio ambient, one that never enrolls what Istio
    manages (its refusals counted in ``registry``)."""
    try:
        source = await workload_source(
            config.source, node=config.node, trust_domain=config.proxy.trust_domain,
            workloads_file=config.workloads_file, kubeconfig=config.kubeconfig,
            backoff_max_s=config.k8s_backoff_max_s, enroll_only=not config.runs_proxy)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return CoexistingSource(source, registry=registry) if config.istio_coexistence else source


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
