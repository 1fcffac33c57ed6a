"""`trellis proxy run`: the node proxy as a process of its own, like ztunnel.

It follows the workload source itself (state, policies, certificates), serves
metrics on 15020 and readiness on 15021, and takes pods from the node agent over
the control socket. It outlives agent restarts: an agent that goes away leaves
every pod served, and the next one's replay reconciles.
"""

from __future__ import annotations

import asyncio
import logging

from nodeagent.admin import AdminServer
from nodeagent.config import AgentConfig
from nodeagent.proxy_stack import ProxyStack, open_source, stop_on_signals
from tunnel import tasks
from tunnel.control_server import ControlServer

_log = logging.getLogger("trellis.nodeagent")


async def run_proxy(config: AgentConfig) -> None:
    assert config.control_socket is not None  # AgentConfig requires it for role "proxy"
    _log.info("node proxy starting", extra={"fields": config.as_log_fields()})
    stack = ProxyStack.build(config)
    control = ControlServer(config.control_socket, stack.proxy, registry=stack.metrics.registry)

    def not_ready() -> str | None:
        if not stack.feed.synced:
            return "waiting for the first workload snapshot"
        return control.not_ready_reason()  # a surge: ready once the pods are ours

    admin = AdminServer(stack.metrics.registry, not_ready)
    await admin.start(config.metrics_address, config.readiness_address)
    stack.certificates.start()
    source = await open_source(config, stack.metrics.registry)

    first = asyncio.Event()

    async def follow_source() -> None:
        async for snapshot in source.snapshots():
            stack.feed.apply(snapshot)
            first.set()

    stop = stop_on_signals()
    follower = tasks.spawn(follow_source(), name="workload source")
    # Take pods only once the source is read: a proxy with an empty view would
    # not know which destinations are in the mesh, and must not guess.
    waiting = {tasks.spawn(first.wait(), name="first snapshot"),
               tasks.spawn(stop.wait(), name="stop")}
    _, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if not stop.is_set():
        await control.start()
        await stop.wait()
    control.close()
    await stack.drain_and_close(config.drain_s)
    follower.cancel()
    admin.close()
