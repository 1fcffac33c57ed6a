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

from identity.ca_client import request_certificate
from identity.certs import CertBundle
from identity.rotation import CertificateManager
from identity.spiffe import Identity
from nodeagent.config import AgentConfig
from nodeagent.drain import drain
from nodeagent.mesh_feed import MeshFeed
from nodeagent.policies import PolicyLoader
from nodeagent.source import WorkloadSource
from nodeagent.sources import workload_source
from tunnel.balancer import RoundRobin
from tunnel.config import ConfigError
from tunnel.context import ProxyInputs, StateView
from tunnel.identities import TlsIdentities
from tunnel.limits import fds_needed, raise_fd_limit
from tunnel.metrics import ProxyMetrics
from tunnel.pool import HboneConnectionPool
from tunnel.proxy import Proxy

_log = logging.getLogger("trellis.nodeagent")


def _certificate_manager(config: AgentConfig) -> CertificateManager:
    assert config.ca_root is not None and config.token_file is not None  # AgentConfig checked
    root_pem = config.ca_root.read_bytes()
    token_file = config.token_file

    async def fetch(identity: Identity) -> CertBundle:
        # Read per request: on Kubernetes this is a projected service-account
        # token, which the kubelet rotates in place.
        token = token_file.read_text().strip()
        return await request_certificate(ca_url=config.ca_url, ca_root_pem=root_pem,
                                         token=token, identity=identity)

    return CertificateManager(fetch)


@dataclass
class ProxyStack:
    proxy: Proxy
    metrics: ProxyMetrics
    certificates: CertificateManager
    feed: MeshFeed

    @classmethod
    def build(cls, config: AgentConfig) -> ProxyStack:
        _fit_fd_limit(config)
        certificates = _certificate_manager(config)
        tls = TlsIdentities(certificates, fetch_timeout=config.cert_fetch_timeout_s)
        certificates.subscribe(tls.on_renewed)
        metrics = ProxyMetrics()
        pool = HboneConnectionPool(
            idle_timeout=config.proxy.pool_idle_timeout_s,
            max_streams_per_connection=config.proxy.max_streams_per_connection)
        # Read at scrape time, on the loop's thread (the admin server is async).
        metrics.hbone_connections.set_function(pool.connection_count)
        inputs = ProxyInputs(config=config.proxy, state=StateView(), tls=tls, pool=pool,
                             metrics=metrics, balancer=RoundRobin())
        proxy = Proxy(inputs)
        feed = MeshFeed(config.node, proxy, certificates, PolicyLoader(config.root_namespace))
        return cls(proxy, metrics, certificates, feed)

    def live_connections(self) -> int:
        return sum(len(p.connections) for p in self.proxy.pods.values())

    async def drain_and_close(self, drain_s: float) -> None:
        await drain(self.live_connections, drain_s)
        _log.info("proxy stopping: closing listeners, keeping pod redirection")
        await self.proxy.close()
        await self.certificates.stop()


def _fit_fd_limit(config: AgentConfig) -> None:
    """Give the proxy the fds its node connection limit needs, before any is opened."""
    needed = fds_needed(config.proxy)
    before, after = raise_fd_limit(needed)
    if after != before:
        _log.info("raised RLIMIT_NOFILE for max_connections_per_node", extra={"fields": {
            "needed": needed, "soft_before": before[0], "hard_before": before[1],
            "soft": after[0], "hard": after[1]}})
    # If it is still short, the proxy lowers its node limit to fit and says so.


async def open_source(config: AgentConfig) -> WorkloadSource:
    try:
        return await workload_source(
            config.source, node=config.node, trust_domain=config.proxy.trust_domain,
            workloads_file=config.workloads_file, kubeconfig=config.kubeconfig,
            backoff_max_s=config.k8s_backoff_max_s, enroll_only=not config.runs_proxy)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
