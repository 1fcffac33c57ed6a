"""The shared node proxy: one event loop serving every enrolled pod on the node.

For each pod it binds three listeners *inside the pod's network namespace*
(15001 outbound, 15006 inbound plaintext, 15008 inbound HBONE). The agent drives
it through ``add_pod`` / ``remove_pod`` / ``update_state``; that small surface is
the seam a later agent↔proxy process split keeps.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

from policy import PolicyIndex
from tunnel import tasks
from tunnel.authorize import recheck_live_connections
from tunnel.config import (
    INBOUND_HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
    PROXY_MARK,
)
from tunnel.context import ProxyInputs
from tunnel.hbone_io import HboneListener, InboundRequest, serve_hbone
from tunnel.inbound import handle_hbone, handle_plaintext
from tunnel.netns import NetnsHandle, listen_in
from tunnel.outbound import handle_outbound
from tunnel.relay import TcpEndpoint
from tunnel.served import ServedPod
from tunnel.state import MeshState, Workload

_log = logging.getLogger("trellis.tunnel.proxy")


class _Listener(Protocol):
    """What the proxy needs of a listener: asyncio's servers and HboneListener alike."""

    def close(self) -> None: ...


class PodListenError(OSError):
    """A listener could not be bound in a pod; the message names pod and port."""


class Proxy:
    def __init__(self, inputs: ProxyInputs) -> None:
        self.inputs = inputs
        self._pods: dict[str, ServedPod] = {}
        self._servers: dict[str, list[_Listener]] = {}

    @property
    def pods(self) -> Mapping[str, ServedPod]:
        return self._pods

    def update_state(self, state: MeshState) -> None:
        self.inputs.state.replace(state)

    def update_policies(self, policies: PolicyIndex) -> int:
        """Enforce ``policies`` from now on, closing live connections they deny.

        Goes beyond ztunnel (which only checks new connections, issue #311):
        a connection opened under an old policy must not outlive its permission.
        Returns how many connections were closed.
        """
        self.inputs.state.replace_policies(policies)
        return recheck_live_connections(self.inputs, list(self._pods.values()))

    async def add_pod(self, workload: Workload, netns: str | NetnsHandle) -> None:
        """Serve ``workload``: bind its listeners in its namespace. Idempotent per uid.

        The namespace comes as a path (in-process agent) or as an open handle (the
        control socket's fd), which the proxy then owns. Adding a pod it already
        serves, with the same address, identity and namespace, keeps the
        listeners and connections as they are: that is what a restarted agent's
        replay does, and it must not disturb traffic."""
        handle = NetnsHandle.open(netns) if isinstance(netns, str) else netns
        current = self._pods.get(workload.uid)
        if current is not None:
            if _same_pod(current, workload, handle):
                handle.close()
                current.workload = workload
                return
            await self.remove_pod(workload.uid)
        pod = ServedPod(workload, handle)
        try:
            servers = await self._listen(pod)
        except BaseException:
            handle.close()
            raise
        self._pods[workload.uid] = pod
        self._servers[workload.uid] = servers
        self.inputs.metrics.pods.set(len(self._pods))
        _log.info("serving pod", extra={"fields": {
            "pod": workload.key, "ip": workload.ip, "identity": workload.identity.uri}})

    async def remove_pod(self, uid: str) -> None:
        """Stop serving a pod: close its listeners and every connection it has."""
        pod = self._pods.pop(uid, None)
        servers = self._servers.pop(uid, [])
        for server in servers:
            server.close()
            if isinstance(server, HboneListener):
                server.abort_connections()
        if pod is None:
            return
        self.inputs.pool.abort_from(pod.workload.ip)
        for live in list(pod.connections):
            if live.handle is not None:
                live.handle.close("pod removed")
        pod.netns.close()
        self.inputs.metrics.pods.set(len(self._pods))
        _log.info("stopped serving pod", extra={"fields": {"pod": pod.workload.key}})

    async def close(self) -> None:
        for uid in list(self._pods):
            await self.remove_pod(uid)
        await self.inputs.pool.close_all()

    async def _listen(self, pod: ServedPod) -> list[_Listener]:
        loop = asyncio.get_running_loop()
        workload = pod.workload
        server_ctx = await self.inputs.tls.server_context(workload.identity)
        servers: list[_Listener] = []
        try:
            outbound = self._bind(pod, OUTBOUND_PORT)
            servers.append(await loop.create_server(
                self._tcp_factory(pod, handle_outbound, "outbound"), sock=outbound))
            plaintext = self._bind(pod, INBOUND_PLAINTEXT_PORT)
            servers.append(await loop.create_server(
                self._tcp_factory(pod, handle_plaintext, "inbound-plaintext"), sock=plaintext))
            hbone = self._bind(pod, INBOUND_HBONE_PORT)

            async def on_request(request: InboundRequest) -> None:
                await handle_hbone(self.inputs, pod, request)

            servers.append(await serve_hbone(hbone, server_ctx, on_request,
                                             trust_domain=self.inputs.config.trust_domain))
        except BaseException:
            for server in servers:
                server.close()
            raise
        return servers

    @staticmethod
    def _bind(pod: ServedPod, port: int) -> socket.socket:
        try:
            return listen_in(pod.netns, port, mark=PROXY_MARK)
        except OSError as exc:
            raise PodListenError(
                exc.errno, f"pod {pod.workload.key}: port {port}: {exc.strerror}") from exc

    def _tcp_factory(self, pod: ServedPod,
                     handler: Callable[[ProxyInputs, ServedPod, TcpEndpoint],
                                       Coroutine[Any, Any, None]],
                     kind: str) -> Callable[[], TcpEndpoint]:
        def on_connection(endpoint: TcpEndpoint) -> None:
            tasks.spawn(handler(self.inputs, pod, endpoint), name=f"{kind} {pod.workload.key}")

        return lambda: TcpEndpoint(on_connection_made=on_connection)


def _same_pod(served: ServedPod, workload: Workload, netns: NetnsHandle) -> bool:
    old = served.workload
    return (old.ip == workload.ip and old.identity == workload.identity
            and served.netns.inode == netns.inode)
