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
from nodeagent.config import AgentConfig
from nodeagent.iptables import IptablesRedirector
from nodeagent.policies import PolicyLoader
from nodeagent.source_file import FileSource
from tunnel import tasks
from tunnel.balancer import RoundRobin
from tunnel.context import ProxyInputs, StateView
from tunnel.identities import TlsIdentities
from tunnel.metrics import ProxyMetrics
from tunnel.pool import HboneConnectionPool
from tunnel.proxy import Proxy

_log = logging.getLogger("trellis.nodeagent")


def _certificate_manager(config: AgentConfig) -> CertificateManager:
    root_pem = config.ca_root.read_bytes()
    token = config.token_file.read_text().strip()

    async def fetch(identity: Identity) -> CertBundle:
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
    reconciler = Reconciler(config.node, proxy, IptablesRedirector(), certificates,
                            PolicyLoader(config.root_namespace))
    admin = AdminServer(metrics.registry, reconciler.not_ready_reason)
    await admin.start(config.metrics_address, config.readiness_address)
    certificates.start()
    source = FileSource(config.workloads_file, node=config.node,
                        trust_domain=config.proxy.trust_domain)

    async def follow_source() -> None:
        async for snapshot in source.snapshots():
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
    _log.info("node agent stopping: closing listeners, keeping pod redirection")
    for worker in workers:
        worker.cancel()
    admin.close()
    # Fail closed: the rules stay, so while no proxy runs an enrolled pod's
    # connections are refused rather than sent in plaintext. A restarted agent
    # re-applies them idempotently and binds the listeners again.
    await reconciler.shutdown(remove_rules=False)
    await certificates.stop()
