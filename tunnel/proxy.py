"""The shared node proxy: one event loop serving every enrolled pod on the node.

For each pod it binds three listeners *inside the pod's network namespace*
(15001 outbound, 15006 inbound plaintext, 15008 inbound HBONE). Every connection
they accept is admitted against the per-pod and per-node limits first, and a
relay idle for ``relay_idle_timeout_s`` is closed (tunnel/limits.py). The agent drives
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
from tunnel.handshake_limit import HandshakeGate, HandshakeLimits
from tunnel.hbone_io import HboneListener, InboundRequest, serve_hbone
from tunnel.inbound import UNAVAILABLE, handle_hbone, handle_plaintext
from tunnel.limits import ConnectionLimits, IdleSweeper
from tunnel.netns import NetnsHandle, listen_in
from tunnel.outbound import handle_outbound
from tunnel.refusals import Direction, record_refusal
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
        # One for the node: pending TLS handshakes on every pod's 15008 together.
        self._handshakes = HandshakeGate(HandshakeLimits.of(inputs.config),
                                         metrics=inputs.metrics)
        self.limits = ConnectionLimits(inputs.config, inputs.metrics, self._pods.values)
        self._idle = IdleSweeper(inputs.config.relay_idle_timeout_s, inputs.metrics,
                                 self._pods.values)
        self._sweeping: asyncio.Task[None] | None = None

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
        if self._sweeping is None:  # needs the running loop, which __init__ may not have
            self._sweeping = tasks.spawn(self._idle.run(), name="idle relay sweeper")
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

    def stop_accepting(self) -> None:
        """Close every pod's listening sockets, keeping the pods and their connections:
        the first step of a drain. A newer proxy bound beside them (``SO_REUSEPORT``)
        takes every new connection from now on, and with ``net.ipv4.tcp_migrate_req``
        in the pod's namespace (nodeagent/iptables.py) the kernel moves the ones
        still queued here to it instead of resetting them."""
        for servers in self._servers.values():
            for server in servers:
                server.close()
                if isinstance(server, HboneListener):
                    # Peers' pooled tunnels would otherwise keep bringing new
                    # streams here until the drain ends and resets them.
                    server.drain_connections()

    async def close(self) -> None:
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
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
                self._tcp_factory(pod, handle_outbound, Direction.OUTBOUND), sock=outbound))
            plaintext = self._bind(pod, INBOUND_PLAINTEXT_PORT)
            servers.append(await loop.create_server(
                self._tcp_factory(pod, handle_plaintext, Direction.INBOUND), sock=plaintext))
            hbone = self._bind(pod, INBOUND_HBONE_PORT)

            async def on_request(request: InboundRequest) -> None:
                refusal = self.limits.admit(pod)
                if refusal is not None:
                    record_refusal(self.inputs.metrics, Direction.INBOUND, refusal,
                                   pod=workload.key, src=request.peer_address,
                                   dst=request.address)
                    request.reject(UNAVAILABLE)
                    return
                try:
                    await handle_hbone(self.inputs, pod, request)
                finally:
                    self.limits.release(pod)

            config = self.inputs.config
            servers.append(await serve_hbone(
                hbone, server_ctx, on_request, trust_domain=config.trust_domain,
                gate=self._handshakes, max_streams=config.max_streams_per_connection,
                metrics=self.inputs.metrics))
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
                     direction: Direction) -> Callable[[], TcpEndpoint]:
        limits = self.limits
        high_water = self.inputs.config.relay_write_high_water_bytes
        name = f"{direction} {pod.workload.key}"

        def release(_: object) -> None:
            limits.release(pod)

        def on_connection(endpoint: TcpEndpoint) -> None:
            refusal = limits.admit(pod)
            if refusal is not None:
                record_refusal(self.inputs.metrics, direction, refusal, pod=pod.workload.key,
                               src=endpoint.peername)
                endpoint.abort()
                return
            # The count drops when the handler ends, however it ends.
            tasks.spawn(handler(self.inputs, pod, endpoint), name=name).add_done_callback(release)

        return lambda: TcpEndpoint(on_connection_made=on_connection, write_high_water=high_water)


def _same_pod(served: ServedPod, workload: Workload, netns: NetnsHandle) -> bool:
    old = served.workload
    return (old.ip == workload.ip and old.identity == workload.identity
            and served.netns.inode == netns.inode)
