"""The agent's side of the CNI plugin: a unix socket that installs redirection on demand.

The container runtime runs ``trellis-cni`` (nodeagent/cni/) while it creates a
pod sandbox, before any container of the pod starts. The plugin sends ADD with
the sandbox's namespace path, the pod's IP (from the interface plugin's result)
and its identity (``K8S_POD_*`` from ``CNI_ARGS``), and waits. We apply the
same rules the reconciler would (``Redirector.apply``, idempotent) and only then
answer ``ok``, so the app's first packet is already captured.

The listeners on 15001/15006/15008 come later, when the workload source reports
the pod and the reconciler enrolls it (its apply is then a no-op). Until then
the captured traffic meets no listener and is refused: the pod starts fail
closed, never in plaintext.

Whether a pod is redirected at all is decided from the agent's latest snapshot
(``decide``): the pod itself if the source already has it (its own label can opt
it out), else its namespace's label. Before the first snapshot, or for a
namespace the source has not seen yet, the answer is "retry", which the plugin
turns into CNI's "try again later".
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from nodeagent.cni.protocol import (
    FrameReader,
    PodRequest,
    PodResponse,
    ProtocolError,
    encode,
    parse_request,
)
from nodeagent.iptables import render_jumps
from nodeagent.redirect import PodNetwork, Redirector
from tunnel.state import AMBIENT, DATAPLANE_LABEL, MeshState

_log = logging.getLogger("trellis.nodeagent.cni")
READ_TIMEOUT_S = 5.0


class Decision(enum.Enum):
    REDIRECT = "redirect"
    SKIP = "skip"  # not in the mesh: leave the pod alone
    RETRY = "retry"  # we cannot tell yet


def decide(state: MeshState | None, request: PodRequest) -> tuple[Decision, str]:
    """Redirect this pod? Pure: the latest snapshot and the request in, a verdict and why out."""
    if state is None:
        return Decision.RETRY, "the agent has no workload snapshot yet"
    for workload in state.workloads:
        if request.pod_uid and workload.uid == request.pod_uid:
            return ((Decision.REDIRECT, "pod is enrolled") if workload.enrolled
                    else (Decision.SKIP, "pod is not enrolled"))
    labels = state.namespace_labels.get(request.pod_namespace)
    if labels is None:
        return Decision.RETRY, f"namespace {request.pod_namespace!r} not known to the agent yet"
    if labels.get(DATAPLANE_LABEL) == AMBIENT:
        return Decision.REDIRECT, f"namespace label {DATAPLANE_LABEL}={AMBIENT}"
    return Decision.SKIP, "namespace is not enrolled"


def check_redirect(netns_path: str, timeout_s: float = 10.0) -> str | None:
    """``None`` if our chains and every jump into them are in place, else what is missing."""
    try:
        done = subprocess.run(["nsenter", f"--net={netns_path}", "iptables-save"],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"iptables-save: {exc}"
    if done.returncode != 0:
        return f"iptables-save in {netns_path} failed: {done.stderr.strip()}"
    missing = render_jumps(done.stdout)
    return f"redirection incomplete, missing:\n{missing}" if missing else None


class CniServer:
    """Serves ``PodRequest``s on a unix socket; one request and one answer per connection."""

    def __init__(self, path: Path, redirector: Redirector,
                 state: Callable[[], MeshState | None], *,
                 check: Callable[[str], str | None] | None = None) -> None:
        self.path = path
        self._redirector = redirector
        self._state = state
        # CHECK can only look at iptables rules today; other modes answer "fine".
        self._check = check or (check_redirect if redirector.name == "iptables"
                                else _no_check)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a previous agent
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        # Only root (the runtime) may ask us to rewrite a namespace's rules.
        os.chmod(self.path, 0o600)
        _log.info("cni socket listening", extra={"fields": {"path": str(self.path)}})

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(_read_request(reader), READ_TIMEOUT_S)
            response = await self.handle(request)
        except (ProtocolError, TimeoutError, ConnectionError) as exc:
            _log.warning("bad cni request", extra={"fields": {"error": str(exc)}})
            response = PodResponse(ok=False, error=f"bad request: {exc}")
        try:
            writer.write(encode(response))
            await writer.drain()
        except ConnectionError:
            pass  # the plugin gave up (timeout); the runtime will retry
        finally:
            writer.close()

    async def handle(self, request: PodRequest) -> PodResponse:
        verdict, why = decide(self._state(), request) if request.op != "del" else (
            Decision.REDIRECT, "delete")
        fields = {"op": request.op, "pod": request.key, "netns": request.netns,
                  "ip": request.pod_ip, "decision": verdict.value, "why": why}
        if verdict is Decision.RETRY:
            _log.info("cni request deferred", extra={"fields": fields})
            return PodResponse(ok=False, error=why, retry=True)
        if verdict is Decision.SKIP:
            _log.info("cni request: pod not in the mesh", extra={"fields": fields})
            return PodResponse(ok=True)
        loop = asyncio.get_running_loop()
        try:
            if request.op == "check":
                problem = await loop.run_in_executor(None, self._check, request.netns)
                if problem:
                    raise OSError(problem)
            elif request.op == "del":
                if request.netns:
                    await loop.run_in_executor(None, self._redirector.remove, _network(request))
            else:
                await loop.run_in_executor(None, self._redirector.apply, _network(request))
        except (OSError, ValueError) as exc:
            _log.error("cni request failed", extra={"fields": {**fields, "error": str(exc)}})
            return PodResponse(ok=False, error=str(exc))
        _log.info("cni request done", extra={"fields": fields})
        return PodResponse(ok=True)


def _no_check(_netns_path: str) -> str | None:
    return None


def _network(request: PodRequest) -> PodNetwork:
    return PodNetwork(uid=request.pod_uid or request.container_id, key=request.key,
                      netns_path=request.netns, ip=request.pod_ip)


async def _read_request(reader: asyncio.StreamReader) -> PodRequest:
    frames = FrameReader()
    while (frame := frames.next_frame()) is None:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("connection closed before a whole request arrived")
        frames.feed(data)
    return parse_request(frame)
