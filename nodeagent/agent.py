"""The node agent's reconcile loop.

Level-based: on every snapshot from the source, and on a short timer, compare
the pods that *should* be served on this node with those that *are*, and close
the gap. A pod that failed (no certificate yet, a rule that did not apply) is
simply not served yet, so the next pass retries it; nothing else waits on it.

Per pod, enrollment runs certificate → listeners → rules, so redirected traffic
never meets a missing listener; removal runs rules → listeners.

The proxy may live in another process (nodeagent/proxy_link.py). When the link
to it is new, the proxy may hold pods this agent never told it about (the agent
restarted) or have lost them all (the proxy restarted), so the reconciler
replays every pod it serves and then says ``snapshot_sent``; the proxy keeps
what was named, without a blip, and drops the rest. The pods' redirection is
never touched by a replay: it is idempotent and stays in place throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from nodeagent.enroll import diff, enrolled_pods
from nodeagent.objects import Snapshot
from nodeagent.proxy_link import PodProxy
from nodeagent.redirect import PodNetwork, Redirector
from tunnel.state import Workload

_log = logging.getLogger("trellis.nodeagent")


# Finds the network namespace of pods whose source does not name one (Kubernetes):
# {uid: netns path} for those it found (nodeagent.podnetns.ProcNetnsResolver).
NetnsResolver = Callable[[Iterable[Workload]], Mapping[str, str]]


class HostRules(Protocol):
    """The node's SNAT of kubelet probes to enrolled pods (nodeagent.host_probe)."""

    def sync(self, pod_ips: Iterable[str]) -> bool: ...

    def remove(self) -> None: ...


@dataclass
class _Served:
    workload: Workload
    network: PodNetwork


@dataclass
class Reconciler:
    node: str
    proxy: PodProxy
    redirector: Redirector
    netns_resolver: NetnsResolver | None = None
    host_rules: HostRules | None = None
    _host_error: str = ""
    _served: dict[str, _Served] = field(default_factory=dict)
    _desired: dict[str, Workload] = field(default_factory=dict)
    _failures: dict[str, str] = field(default_factory=dict)
    _have_snapshot: bool = False
    _synced: bool = False
    # The proxy link generation the served pods were told to; None: none yet.
    _generation: int | None = None
    _replay_pending: bool = False
    _untold: set[str] = field(default_factory=set)  # served pods a new link has not heard of
    _proxy_error: str = ""
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def not_ready_reason(self) -> str | None:
        if self._proxy_error:
            return self._proxy_error
        if not self._synced:
            return "waiting for the first workload snapshot"
        pending = sorted(set(self._desired) - set(self._served))
        if pending:
            names = ", ".join(self._desired[uid].key for uid in pending[:5])
            return f"{len(pending)} enrolled pods not served yet: {names}"
        return None

    @property
    def served_count(self) -> int:
        return len(self._served)

    async def apply_snapshot(self, snapshot: Snapshot) -> None:
        self._desired = {w.uid: w for w in enrolled_pods(snapshot.state, self.node)}
        self._have_snapshot = True
        await self.reconcile()
        self._synced = True

    async def reconcile(self) -> None:
        # Before the first snapshot the agent knows no pods, and a replay would
        # tell the proxy to drop every pod it serves.
        if not self._have_snapshot:
            return
        async with self._lock:
            linked = await self._link()
            await self._resolve_netns()
            # Unenrolling needs no proxy: taking the redirection out is what
            # matters, and the proxy forgets the pod at the latest on the next
            # replay.
            for workload in self._stale():
                await self._unenroll(workload.uid)
            await self._sync_host_rules()
            if not linked:
                return
            retell = [self._served[uid].workload for uid in self._untold if uid in self._served]
            missing = [w for uid, w in self._desired.items() if uid not in self._served]
            await asyncio.gather(*(self._retell(w) for w in retell),
                                 *(self._enroll(w) for w in missing))
            if self._replay_pending and not self._untold.intersection(self._served):
                await self._end_replay()

    async def _link(self) -> bool:
        """Make sure the proxy is reachable; on a new link, start a replay."""
        try:
            generation = await self.proxy.connect()
        except OSError as exc:
            if self._proxy_error != str(exc):
                _log.error("node proxy unreachable; pods keep their redirection",
                           extra={"fields": {"error": str(exc)}})
            self._proxy_error = str(exc)
            return False
        self._proxy_error = ""
        if generation != self._generation:
            # What the old link was told is unknown to the new one: tell it again.
            self._generation = generation
            self._untold = set(self._served)
            self._replay_pending = True
        return True

    async def _retell(self, workload: Workload) -> None:
        """Tell a new link about a pod already enrolled; its redirection stays as is."""
        try:
            await self.proxy.add_pod(workload, self._served[workload.uid].network.netns_path)
        except (TimeoutError, OSError, ValueError) as exc:
            self._fail(workload, f"listeners: {exc or 'certificate timeout'}")
            return
        self._untold.discard(workload.uid)
        self._failures.pop(workload.uid, None)

    async def _sync_host_rules(self) -> None:
        """Probes are SNATed for every pod that has, or is about to get, its in-pod
        rules: those served and those desired (the CNI hook redirects a new pod
        before the reconciler serves it, and its probes start at once)."""
        if self.host_rules is None:
            return
        pods = [*self._desired.values(), *(s.workload for s in self._served.values())]
        ips = frozenset(w.ip for w in pods if w.ip)
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.host_rules.sync, ips)
        except (OSError, ValueError) as exc:
            if self._host_error != str(exc):
                _log.error("host probe rules not set; kubelet probes reach the proxy",
                           extra={"fields": {"error": str(exc)}})
            self._host_error = str(exc)
            return
        self._host_error = ""

    async def _end_replay(self) -> None:
        try:
            await self.proxy.snapshot_sent()
        except OSError as exc:
            _log.warning("replay not finished; will retry", extra={"fields": {
                "error": str(exc)}})
            return
        self._replay_pending = False
        _log.info("proxy told every served pod", extra={"fields": {
            "served": len(self._served)}})

    def _stale(self) -> list[Workload]:
        """Served pods to tear down: gone, moved to another IP or namespace (from
        ``enroll.diff``), or now running under another identity, whose
        certificate the pod's 15008 listener would no longer present."""
        served = {uid: s.workload for uid, s in self._served.items()}
        changes = diff(served.values(), self._desired.values())
        return [*changes.removed,
                *(w for w in changes.changed if w.identity != served[w.uid].identity)]

    async def _resolve_netns(self) -> None:
        """Fill in the namespace of desired pods that came without one. A served pod
        keeps the one it was enrolled with while that process lives; only the
        others cost a scan, one for all of them."""
        unknown = [w for w in self._desired.values() if not w.netns]
        if self.netns_resolver is None or not unknown:
            return
        known = {uid: s.network.netns_path for uid, s in self._served.items()
                 if os.path.exists(s.network.netns_path)}
        missing = [w for w in unknown if w.uid not in known]
        found: Mapping[str, str] = {}
        if missing:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(None, self.netns_resolver, missing)
        for w in unknown:
            if path := known.get(w.uid) or found.get(w.uid):
                self._desired[w.uid] = dataclasses.replace(w, netns=path)

    async def shutdown(self, *, remove_rules: bool) -> None:
        async with self._lock:
            for uid in list(self._served):
                if remove_rules:
                    await self._unenroll(uid)
            if remove_rules and self.host_rules is not None:
                try:
                    await asyncio.get_running_loop().run_in_executor(None,
                                                                     self.host_rules.remove)
                except OSError as exc:
                    _log.warning("removing host probe rules failed", extra={"fields": {
                        "error": str(exc)}})
            await self.proxy.close()

    async def _enroll(self, workload: Workload) -> None:
        if not workload.netns:
            self._fail(workload, "no network namespace known for the pod " + (
                "(no running process of it in /proc yet)" if self.netns_resolver
                else "(metadata.annotations['trellis.dev/netns'])"))
            return
        network = PodNetwork.of(workload)
        loop = asyncio.get_running_loop()
        try:
            await self.proxy.add_pod(workload, workload.netns)
        except (TimeoutError, OSError, ValueError) as exc:
            self._fail(workload, f"listeners: {exc or 'certificate timeout'}")
            return
        try:
            await loop.run_in_executor(None, self.redirector.apply, network)
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                await self.proxy.remove_pod(workload.uid)
            self._fail(workload, f"redirection: {exc}")
            return
        self._served[workload.uid] = _Served(workload, network)
        self._failures.pop(workload.uid, None)
        _log.info("pod enrolled", extra={"fields": {
            "pod": workload.key, "ip": workload.ip, "redirect": self.redirector.name}})

    async def _unenroll(self, uid: str) -> None:
        served = self._served.pop(uid)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.redirector.remove, served.network)
        except (OSError, ValueError) as exc:
            # The namespace may already be gone with its pod; nothing is left to undo.
            _log.warning("removing redirection failed", extra={"fields": {
                "pod": served.workload.key, "error": str(exc)}})
        try:
            await self.proxy.remove_pod(uid)
        except OSError as exc:
            # The next link's replay leaves it out, so the proxy drops it then.
            _log.warning("proxy did not take the removal yet", extra={"fields": {
                "pod": served.workload.key, "error": str(exc)}})
        _log.info("pod unenrolled", extra={"fields": {"pod": served.workload.key}})

    def _fail(self, workload: Workload, why: str) -> None:
        # Log once per distinct reason, not on every retry tick.
        if self._failures.get(workload.uid) != why:
            self._failures[workload.uid] = why
            _log.error("pod not enrolled", extra={"fields": {"pod": workload.key, "error": why}})
