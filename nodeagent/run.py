"""The node agent process: wires source, certificates, proxy, redirection and admin."""

from __future__ import annotations

import asyncio
import logging
import signal

from identity.ca_client import request_certificate
from identity.certs import CertBundle
from identity.rotation import CertificateManager
from identity.spiffe import Identity
from nodeagent.admin import AdminServer
from nodeagent.agent import Reconciler
from nodeagent.cni_server import CniServer
from nodeagent.config import AgentConfig
from nodeagent.drain import drain
from nodeagent.policies import PolicyLoader
from nodeagent.redirect_modes import make_redirector
from nodeagent.sources import netns_resolver, workload_source
from tunnel import tasks
from tunnel.balancer import RoundRobin
from tunnel.config import ConfigError
from tunnel.context import ProxyInputs, StateView
from tunnel.identities import TlsIdentities
from tunnel.metrics import ProxyMetrics
from tunnel.pool import HboneConnectionPool
from tunnel.proxy import Proxy
from tunnel.state import MeshState

_log = logging.getLogger("trellis.nodeagent")


def _certificate_manager(config: AgentConfig) -> CertificateManager:
    root_pem = config.ca_root.read_bytes()

    async def fetch(identity: Identity) -> CertBundle:
        # Read per request: on Kubernetes this is a projected service-account
        # token, which the kubelet rotates in place.
        token = config.token_file.read_text().strip()
        return await request_certificate(ca_url=config.ca_url, ca_root_pem=root_pem,
                                         token=token, identity=identity)

    return CertificateManager(fetch)


async def run_agent(config: AgentConfig) -> None:
    _log.info("node agent starting", extra={"fields": config.as_log_fields()})
    certificates = _certificate_manager(config)
    tls = TlsIdentities(certificates, fetch_timeout=config.cert_fetch_timeout_s)
    certificates.subscribe(tls.on_renewed)
    metrics = ProxyMetrics()
    pool = HboneConnectionPool(idle_timeout=config.proxy.pool_idle_timeout_s)
    # Read at scrape time, on the loop's thread (the admin server is async).
    metrics.hbone_connections.set_function(pool.connection_count)
    inputs = ProxyInputs(config=config.proxy, state=StateView(), tls=tls, pool=pool,
                         metrics=metrics, balancer=RoundRobin())
    proxy = Proxy(inputs)
    redirector = make_redirector(config.redirect, bpf_root=config.effective_bpf_root,
                                 fallback=config.redirect_fallback)
    reconciler = Reconciler(config.node, proxy, redirector, certificates,
                            PolicyLoader(config.root_namespace),
                            netns_resolver=netns_resolver(config.source))
    admin = AdminServer(metrics.registry, reconciler.not_ready_reason)
    await admin.start(config.metrics_address, config.readiness_address)
    certificates.start()
    try:
        source = await workload_source(
            config.source, node=config.node, trust_domain=config.proxy.trust_domain,
            workloads_file=config.workloads_file, kubeconfig=config.kubeconfig,
            backoff_max_s=config.k8s_backoff_max_s)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    latest: list[MeshState] = []  # the CNI server decides enrollment from the last snapshot
    cni = (CniServer(config.cni_socket, reconciler.redirector,
                     lambda: latest[-1] if latest else None)
           if config.cni_socket else None)
    if cni is not None:
        await cni.start()

    async def follow_source() -> None:
        async for snapshot in source.snapshots():
            latest[:] = [snapshot.state]
            await reconciler.apply_snapshot(snapshot)

    async def retry_failures() -> None:
        while True:
            await asyncio.sleep(config.reconcile_interval_s)
            await reconciler.reconcile()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    workers = [tasks.spawn(follow_source(), name="workload source"),
               tasks.spawn(retry_failures(), name="reconcile timer")]
    await stop.wait()
    if cni is not None:
        cni.close()  # new pods wait (CNI "try again later") until an agent is back
    await drain(lambda: sum(len(p.connections) for p in proxy.pods.values()),
                config.drain_s)
    _log.info("node agent stopping: closing listeners, keeping pod redirection")
    for worker in workers:
        worker.cancel()
    admin.close()
    # Fail closed: the rules stay, so while no proxy runs an enrolled pod's
    # connections are refused rather than sent in plaintext. A restarted agent
    # re-applies them idempotently and binds the listeners again.
    await reconciler.shutdown(remove_rules=False)
    await certificates.stop()
