"""The agent's side of the CNI plugin: a unix socket that installs redirection on demand.

The container runtime runs ``trellis-cni`` (nodeagent/cni/plugin/, a static C
forwarder) while it creates a pod sandbox, before any container of the pod
starts. The plugin hands us the call as the runtime made it (``CNI_*`` and the
configuration); we read it with ``spec.py``: the sandbox's namespace path, the
pod's IP (from the interface plugin's result) and its identity (``K8S_POD_*``
from ``CNI_ARGS``). For ADD we apply the same rules the reconciler would
(``Redirector.apply``, idempotent) and only then answer, so the app's first
packet is already captured. What the plugin prints comes from here too.

The listeners on 15001/15006/15008 come later, when the workload source reports
the pod and the reconciler enrolls it (its apply is then a no-op). Until then
the captured traffic meets no listener and is refused: the pod starts fail
closed, never in plaintext.

Whether a pod is redirected at all is decided from the agent's latest snapshot
(``decide``): the pod itself if the source already has it (its own label can opt
it out), else its namespace's label. Before the first snapshot, or for a
namespace the source has not seen yet, the answer is "retry", which the plugin
turns into CNI's "try again later". For the time no agent runs, the server keeps
``<socket>.fallback`` up to date: per namespace, whether the plugin may let a
new pod through without us (nodeagent/cni/fallback.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

from nodeagent.cni import fallback, spec
from nodeagent.cni.protocol import (
    FrameReader,
    PluginCall,
    PluginReply,
    PodRequest,
    PodResponse,
    ProtocolError,
    encode_reply,
    parse_call,
)
from nodeagent.iptables import render_jumps
from nodeagent.redirect import PodNetwork, Redirector
from tunnel import tasks
from tunnel.state import AMBIENT, DATAPLANE_LABEL, MeshState
from tunnel.unix_socket import bind_private_unix_socket, default_allowed_uids, peer_refusal

_log = logging.getLogger("trellis.nodeagent.cni")
READ_TIMEOUT_S = 5.0
FALLBACK_INTERVAL_S = 0.5  # how soon a new snapshot reaches <socket>.fallback
# Pods whose rules ADD installed, remembered until DEL, so that an uninstall can
# remove them even if the reconciler never served the pod. A node runs a few
# hundred pods at most; past this bound the oldest entry is forgotten.
MAX_APPLIED = 4096


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
        self.fallback_path = fallback.fallback_path(path)
        self._publisher: asyncio.Task[None] | None = None
        # The previous agent's verdicts, for the time before our first snapshot.
        self._inherited: dict[str, fallback.Fallback] = {}
        self._applied: dict[str, PodNetwork] = {}  # container id → what ADD redirected
        self.refused_peers = 0  # connections whose SO_PEERCRED uid was not allowed

    async def start(self) -> None:
        self._inherited = fallback.read(self.fallback_path)
        # Only root (the runtime) may ask us to rewrite a namespace's rules: the socket
        # is 0600 from its first moment (it replaces one a previous agent left), and
        # _serve checks each peer's uid as well (tunnel/unix_socket.py).
        sock = bind_private_unix_socket(self.path)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        self._publisher = tasks.spawn(self._publish_fallback(), name="cni fallback verdicts")
        _log.info("cni socket listening", extra={"fields": {"path": str(self.path)}})

    def close(self) -> None:
        """Stop serving. The fallback file stays: it is what the plugin reads while
        no agent runs (an uninstall removes it with the plugin)."""
        if self._publisher is not None:
            self._publisher.cancel()
            self._publisher = None
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _publish_fallback(self) -> None:
        written: str | None = None
        seen: MeshState | None = None
        while True:
            state = self._state()
            if state is not None and state is not seen:
                seen = state
                text = fallback.render(fallback.verdicts(state))
                if text != written:
                    try:
                        fallback.write(self.fallback_path, text)
                        written = text
                    except OSError as exc:
                        seen = None  # try again next time
                        _log.warning("cannot write the plugin's fallback verdicts", extra={
                            "fields": {"path": str(self.fallback_path), "error": str(exc)}})
            await asyncio.sleep(FALLBACK_INTERVAL_S)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        refusal = peer_refusal(writer.get_extra_info("socket"), default_allowed_uids())
        if refusal is not None:
            self.refused_peers += 1
            if self.refused_peers == 1 or self.refused_peers % 100 == 0:  # rate-limited
                _log.warning("cni connection refused", extra={"fields": {
                    "reason": refusal, "refused_total": self.refused_peers}})
            writer.close()
            return
        try:
            call = await asyncio.wait_for(_read_call(reader), READ_TIMEOUT_S)
            output = await self.answer(call)
        except (ProtocolError, TimeoutError, ConnectionError) as exc:
            _log.warning("bad cni request", extra={"fields": {"error": str(exc)}})
            output = spec.error_output(spec.CniError(spec.IO_FAILURE, "bad request to the "
                                                     "trellis node agent", str(exc)))
        body = (output.stdout + "\n").encode() if output.stdout else b""
        try:
            writer.write(encode_reply(PluginReply(output.exit_code, body)))
            await writer.drain()
        except ConnectionError:
            pass  # the plugin gave up (timeout); the runtime will retry
        finally:
            writer.close()

    async def answer(self, call: PluginCall) -> spec.Output:
        """One CNI call, start to end: what the plugin prints and exits with."""
        version = "1.0.0"
        try:
            invocation = spec.parse_invocation(call.env, call.stdin)
            version = invocation.cni_version
            if invocation.command == "VERSION":
                return spec.version_output(version)
            if spec.passes_without_agent(invocation) is not None:
                return spec.success_output(invocation)  # the plugin does this itself too
            request = _request(invocation)
            reply = await self.handle(request)
            if not reply.ok:
                code = spec.TRY_AGAIN_LATER if reply.retry else spec.IO_FAILURE
                raise spec.CniError(code, f"{invocation.command} {request.key}: {reply.error}",
                                    invocation.container_id)
            return spec.success_output(invocation)
        except spec.CniError as exc:
            return spec.error_output(exc, version)

    async def handle(self, request: PodRequest) -> PodResponse:
        state = self._state()
        verdict, why = decide(state, request) if request.op != "del" else (
            Decision.REDIRECT, "delete")
        if (verdict is Decision.RETRY and state is None
                and self._inherited.get(request.pod_namespace) is fallback.Fallback.PASS):
            verdict, why = Decision.SKIP, "no snapshot yet; the last agent passed this namespace"
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
                self._applied.pop(request.container_id, None)
                if request.netns:
                    await loop.run_in_executor(None, self._redirector.remove, _network(request))
            else:
                await loop.run_in_executor(None, self._redirector.apply, _network(request))
                self._remember(request.container_id, _network(request))
        except (OSError, ValueError) as exc:
            _log.error("cni request failed", extra={"fields": {**fields, "error": str(exc)}})
            return PodResponse(ok=False, error=str(exc))
        _log.info("cni request done", extra={"fields": fields})
        return PodResponse(ok=True)


    def applied(self) -> list[PodNetwork]:
        """Pods whose redirection ADD installed and no DEL removed yet."""
        return list(self._applied.values())

    def _remember(self, container_id: str, network: PodNetwork) -> None:
        self._applied.pop(container_id, None)
        if len(self._applied) >= MAX_APPLIED:
            del self._applied[next(iter(self._applied))]
        self._applied[container_id] = network


def _no_check(_netns_path: str) -> str | None:
    return None


def _network(request: PodRequest) -> PodNetwork:
    return PodNetwork(uid=request.pod_uid or request.container_id, key=request.key,
                      netns_path=request.netns, ip=request.pod_ip)


def _request(invocation: spec.Invocation) -> PodRequest:
    ip = spec.pod_ip(invocation) if invocation.command != "DEL" else ""
    return PodRequest(op=invocation.command.lower(), container_id=invocation.container_id,
                      netns=invocation.netns, pod_ip=ip,
                      pod_namespace=invocation.pod_namespace, pod_name=invocation.pod_name,
                      pod_uid=invocation.pod_uid)


async def _read_call(reader: asyncio.StreamReader) -> PluginCall:
    frames = FrameReader()
    while (frame := frames.next_frame()) is None:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("connection closed before a whole request arrived")
        frames.feed(data)
    return parse_call(frame)
