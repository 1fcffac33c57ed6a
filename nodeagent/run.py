"""The node agent process: wires source, redirection, admin, and the proxy link.

Without ``--control-socket`` the agent runs the node proxy in its own process
(one process per node: simplest, for a VM or a small lab). With it, the proxy
is another process (``trellis proxy run``) and the agent only enrolls: it finds
pods, installs their redirection and hands each pod's namespace to the proxy.
Then either can restart alone, and while the agent is down the pods keep
working, because their redirection and the proxy's listeners both stay.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Gauge

from nodeagent.admin import AdminServer
from nodeagent.agent import Reconciler
from nodeagent.cni.lifecycle import stop_redirection
from nodeagent.cni_server import CniServer
from nodeagent.config import AgentConfig
from nodeagent.host_probe import HostProbeRules
from nodeagent.proxy_link import LocalProxy, PodProxy, RemoteProxy
from nodeagent.proxy_stack import ProxyStack, open_source, stop_on_signals
from nodeagent.redirect_modes import make_redirector
from nodeagent.sources import netns_resolver
from tunnel import tasks
from tunnel.state import MeshState

_log = logging.getLogger("trellis.nodeagent")


def _agent_registry(reconciler: Reconciler, link: RemoteProxy) -> CollectorRegistry:
    """The split agent's own metrics (the proxy exports the traffic metrics)."""
    registry = CollectorRegistry()
    Gauge("trellis_agent_enrolled_pods", "Pods this agent has enrolled (redirection on, "
          "proxy told)", registry=registry).set_function(lambda: reconciler.served_count)
    Gauge("trellis_agent_proxy_connected", "1 while the control socket to the node proxy "
          "is connected", registry=registry).set_function(lambda: int(link.connected))
    return registry


async def run_agent(config: AgentConfig) -> None:
    _log.info("node agent starting", extra={"fields": config.as_log_fields()})
    redirector = make_redirector(config.redirect, bpf_root=config.effective_bpf_root,
                                 fallback=config.redirect_fallback)
    stack: ProxyStack | None = None
    remote: RemoteProxy | None = None
    link: PodProxy
    if config.control_socket is None:
        stack = ProxyStack.build(config)
        link = LocalProxy(stack.proxy)
    else:
        link = remote = RemoteProxy(config.control_socket, config.node,
                                    on_connect=getattr(redirector, "follow_proxy", None))
    reconciler = Reconciler(config.node, link, redirector,
                            netns_resolver=netns_resolver(config.source),
                            host_rules=HostProbeRules(config.host_netns)
                            if config.host_netns else None)
    if stack is not None:
        registry = stack.metrics.registry
    else:
        assert remote is not None  # set whenever there is no stack
        registry = _agent_registry(reconciler, remote)
    admin = AdminServer(registry, reconciler.not_ready_reason)
    await admin.start(config.metrics_address, config.readiness_address)
    if stack is not None:
        stack.certificates.start()
    source = await open_source(config, registry)
    latest: list[MeshState] = []  # the CNI server decides enrollment from the last snapshot
    cni = (CniServer(config.cni_socket, reconciler.redirector,
                     lambda: latest[-1] if latest else None)
           if config.cni_socket else None)
    if cni is not None:
        await cni.start()

    async def follow_source() -> None:
        async for snapshot in source.snapshots():
            latest[:] = [snapshot.state]
            if stack is not None:
                stack.feed.apply(snapshot)
            await reconciler.apply_snapshot(snapshot)

    async def retry_failures() -> None:
        # Also what reconnects to a restarted proxy and replays the pods to it.
        while True:
            await asyncio.sleep(config.reconcile_interval_s)
            await reconciler.reconcile()

    stop = stop_on_signals()
    workers = [tasks.spawn(follow_source(), name="workload source"),
               tasks.spawn(retry_failures(), name="reconcile timer")]
    await stop.wait()
    if cni is not None:
        cni.close()  # new pods wait (CNI "try again later") until an agent is back
    if stack is not None:
        await stack.drain_and_close(config.drain_s)
    for worker in workers:
        worker.cancel()
    admin.close()
    # Fail closed: the rules stay, so while no proxy runs an enrolled pod's
    # connections are refused rather than sent in plaintext. A restarted agent
    # re-applies them idempotently and the proxy binds the listeners again. Only
    # an uninstall (the chart's DaemonSet is gone) removes them.
    await stop_redirection(reconciler, config.kubeconfig, cni.applied() if cni is not None else ())
