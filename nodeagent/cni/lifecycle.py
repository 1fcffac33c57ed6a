"""Uninstall or upgrade? What a stopping installer (or agent) asks the API server.

A DaemonSet's pod gets the same SIGTERM when the DaemonSet is updated (the
rolling update replaces the pod; the DaemonSet stays) and when it is deleted
(``helm uninstall``: with the default background cascade the DaemonSet object
goes first and the garbage collector then deletes its pods; with foreground
deletion it carries a ``deletionTimestamp`` until its pods are gone). istio-cni
tells the two apart the same way, by reading its DaemonSet when it stops:

- the DaemonSet is there and not being deleted → an upgrade: keep everything,
  the next pod takes over (the plugin stays chained, pods keep their rules);
- the API server says that DaemonSet is not found (a ``NotFound`` Status naming
  it), or it has a ``deletionTimestamp`` → an uninstall: remove everything;
- anything else (API server unreachable, 403, a 404 that does not name the
  DaemonSet, a timeout) → we cannot tell, so we keep everything. istio-cni
  cleans up when its read fails; we do not, because the two mistakes are not
  equal: a plugin kept by mistake only makes new pods of mesh namespaces wait
  (every other pod passes on the agent's fallback verdicts), and
  ``trellis cni install --remove`` undoes it; rules removed by mistake during
  an upgrade would let enrolled pods talk in plaintext.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from nodeagent.k8s_client import api_client, load_configuration

if TYPE_CHECKING:
    from nodeagent.agent import Reconciler
    from nodeagent.redirect import PodNetwork

_log = logging.getLogger("trellis.cni.lifecycle")
READ_TIMEOUT_S = 5.0  # inside the grace period, with room for the clean-up after it
# Set by the chart on the agent container: NAMESPACE/NAME of the DaemonSet that runs it.
OWNER_ENV = "TRELLIS_OWNER_DAEMONSET"


@dataclass(frozen=True, slots=True)
class DaemonSetRef:
    namespace: str
    name: str

    @classmethod
    def parse(cls, value: str) -> DaemonSetRef:
        namespace, sep, name = value.partition("/")
        if not sep or not namespace or not name or "/" in name:
            raise ValueError(f"{value!r} is not NAMESPACE/NAME")
        return cls(namespace, name)

    @property
    def path(self) -> str:
        return f"/apis/apps/v1/namespaces/{self.namespace}/daemonsets/{self.name}"


class Presence(enum.Enum):
    PRESENT = "present"
    DELETING = "deleting"
    GONE = "gone"
    UNKNOWN = "unknown"

    @property
    def is_uninstall(self) -> bool:
        return self in (Presence.DELETING, Presence.GONE)


def presence_of(status: int, body: Any, ref: DaemonSetRef) -> Presence:
    """Pure: the API server's answer to GET of the DaemonSet → what it means."""
    if not isinstance(body, dict):
        return Presence.UNKNOWN
    if status == 200 and body.get("kind") in (None, "DaemonSet"):
        metadata = body.get("metadata") or {}
        return Presence.DELETING if metadata.get("deletionTimestamp") else Presence.PRESENT
    details = body.get("details") or {}
    if (status == 404 and body.get("reason") == "NotFound" and isinstance(details, dict)
            and details.get("name") == ref.name):
        return Presence.GONE
    return Presence.UNKNOWN


async def daemonset_presence(ref: DaemonSetRef, kubeconfig: Path | None = None,
                             timeout_s: float = READ_TIMEOUT_S) -> Presence:
    try:
        configuration = await load_configuration(kubeconfig)
    except ValueError as exc:
        _log.warning("cannot tell an uninstall from an upgrade", extra={"fields": {
            "daemonset": ref.path, "error": str(exc)}})
        return Presence.UNKNOWN
    async with api_client(configuration) as api:
        try:
            response = await api.call_api(
                ref.path, "GET", header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=timeout_s))
            try:
                body = json.loads(await response.read())
            except ValueError:
                body = None
            finally:
                response.release()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            _log.warning("cannot tell an uninstall from an upgrade", extra={"fields": {
                "daemonset": ref.path, "error": str(exc) or type(exc).__name__}})
            return Presence.UNKNOWN
    presence = presence_of(response.status, body, ref)
    _log.info("owner DaemonSet looked up", extra={"fields": {
        "daemonset": ref.path, "http_status": response.status, "presence": presence.value}})
    return presence


async def check_uninstall(ref: DaemonSetRef, kubeconfig: Path | None = None) -> bool:
    """True only when the API server says the DaemonSet is gone or going."""
    return (await daemonset_presence(ref, kubeconfig)).is_uninstall


async def uninstalling(kubeconfig: Path | None = None,
                       environ: Mapping[str, str] = os.environ) -> bool:
    """The agent's question on SIGTERM. Without ``TRELLIS_OWNER_DAEMONSET`` (a lab, a
    VM: no DaemonSet owns us) the answer is always no."""
    value = environ.get(OWNER_ENV, "")
    if not value:
        return False
    try:
        ref = DaemonSetRef.parse(value)
    except ValueError as exc:
        _log.warning("cannot tell an uninstall from an upgrade", extra={"fields": {
            "setting": OWNER_ENV, "error": str(exc)}})
        return False
    return await check_uninstall(ref, kubeconfig)


async def stop_redirection(reconciler: Reconciler, kubeconfig: Path | None = None,
                           cni_applied: Iterable[PodNetwork] = ()) -> bool:
    """The agent's last step: pods keep their redirection (fail closed: with no proxy
    their connections are refused, never sent in plaintext, and the next agent
    re-applies it), except on an uninstall, where nothing would ever serve it
    again: then every served pod's, and every pod's that CNI ADD redirected
    (``cni_applied``: the reconciler may not have served it yet), is removed.
    Returns whether it was removed."""
    uninstall = await uninstalling(kubeconfig)
    _log.info("node agent stopping", extra={"fields": {
        "pod_redirection": "removed (uninstall)" if uninstall else "kept"}})
    await reconciler.shutdown(remove_rules=uninstall)
    if uninstall:
        loop = asyncio.get_running_loop()
        for network in cni_applied:  # remove() is idempotent: served ones are gone already
            try:
                await loop.run_in_executor(None, reconciler.redirector.remove, network)
            except OSError as exc:
                _log.error("uninstall: pod redirection not removed", extra={"fields": {
                    "pod": network.key, "error": str(exc)}})
    return uninstall
