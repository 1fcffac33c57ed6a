"""The node agent's reconcile loop.

Level-based: on every snapshot from the source, and on a short timer, compare
the pods that *should* be served on this node with those that *are*, and close
the gap. A pod that failed (no certificate yet, a rule that did not apply) is
simply not served yet, so the next pass retries it; nothing else waits on it.

Per pod, enrollment runs certificate → listeners → rules, so redirected traffic
never meets a missing listener; removal runs rules → listeners.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from identity.spiffe import Identity
from nodeagent.enroll import diff, enrolled_pods
from nodeagent.objects import Snapshot
from nodeagent.policies import PolicyLoader
from nodeagent.redirect import PodNetwork, Redirector
from tunnel.proxy import Proxy
from tunnel.state import Workload

_log = logging.getLogger("trellis.nodeagent")


class CertificateTracker(Protocol):
    """The part of identity.rotation.CertificateManager the reconciler needs."""

    def track(self, identity: Identity) -> None: ...

    def untrack(self, identity: Identity) -> None: ...


# Finds the network namespace of pods whose source does not name one (Kubernetes):
# {uid: netns path} for those it found (nodeagent.podnetns.ProcNetnsResolver).
NetnsResolver = Callable[[Iterable[Workload]], Mapping[str, str]]


@dataclass
class _Served:
    workload: Workload
    network: PodNetwork


@dataclass
class Reconciler:
    node: str
    proxy: Proxy
    redirector: Redirector
    certificates: CertificateTracker
    policies: PolicyLoader
    netns_resolver: NetnsResolver | None = None
    _served: dict[str, _Served] = field(default_factory=dict)
    _desired: dict[str, Workload] = field(default_factory=dict)
    _failures: dict[str, str] = field(default_factory=dict)
    _tracked: frozenset[Identity] = frozenset()
    _synced: bool = False
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def not_ready_reason(self) -> str | None:
        if not self._synced:
            return "waiting for the first workload snapshot"
        pending = sorted(set(self._desired) - set(self._served))
        if pending:
            names = ", ".join(self._desired[uid].key for uid in pending[:5])
            return f"{len(pending)} enrolled pods not served yet: {names}"
        return None

    async def apply_snapshot(self, snapshot: Snapshot) -> None:
        self.proxy.update_state(snapshot.state)
        closed = self.proxy.update_policies(self.policies.load(snapshot.policies,
                                                               snapshot.source))
        if closed:
            _log.info("policy update closed live connections", extra={"fields": {
                "closed": closed}})
        self._desired = {w.uid: w for w in enrolled_pods(snapshot.state, self.node)}
        # Fetch certificates only for identities that run here, and stop
        # renewing those that no longer do.
        wanted = frozenset(w.identity for w in self._desired.values())
        for identity in wanted - self._tracked:
            self.certificates.track(identity)
        for identity in self._tracked - wanted:
            self.certificates.untrack(identity)
        self._tracked = wanted
        await self.reconcile()
        self._synced = True

    async def reconcile(self) -> None:
        async with self._lock:
            await self._resolve_netns()
            for workload in self._stale():
                await self._unenroll(workload.uid)
            missing = [w for uid, w in self._desired.items() if uid not in self._served]
            await asyncio.gather(*(self._enroll(w) for w in missing))

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
        await self.proxy.remove_pod(uid)
        _log.info("pod unenrolled", extra={"fields": {"pod": served.workload.key}})

    def _fail(self, workload: Workload, why: str) -> None:
        # Log once per distinct reason, not on every retry tick.
        if self._failures.get(workload.uid) != why:
            self._failures[workload.uid] = why
            _log.error("pod not enrolled", extra={"fields": {"pod": workload.key, "error": why}})
