"""The CA's two Kubernetes inputs, wired once for ``trellis ca serve --source kubernetes``
(and the tests): who is calling (TokenReview) and what runs where (the source).

The root key on Kubernetes lives in a Secret mounted as the CA's ``--state-dir``;
``CertificateAuthority.load_or_create`` reads it from there unchanged (the chart
creates the Secret; a read-only mount means the CA never writes a new key).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes_asyncio import client

from nodeagent.ca_registry import SnapshotRegistry
from nodeagent.k8s_auth import DEFAULT_AUDIENCE, TokenReviewAuthenticator
from nodeagent.source import WorkloadSource
from nodeagent.source_k8s import PODS, KubernetesSource
from tunnel import tasks


@dataclass(frozen=True)
class KubernetesCaInputs:
    registry: SnapshotRegistry
    authenticator: TokenReviewAuthenticator
    follower: asyncio.Task[None]
    api: client.ApiClient

    async def close(self) -> None:
        self.follower.cancel()
        await asyncio.gather(self.follower, return_exceptions=True)
        await self.api.close()


def parse_service_account(value: str, setting: str) -> tuple[str, str]:
    namespace, sep, name = value.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(f"{setting}: {value!r} is not NAMESPACE/NAME")
    return namespace, name


async def follow_registry(source: WorkloadSource) -> tuple[SnapshotRegistry, asyncio.Task[None]]:
    """A registry filled from ``source``: ready once the first snapshot is in."""
    registry = SnapshotRegistry()
    snapshots = source.snapshots()
    registry.update(await anext(snapshots))

    async def follow() -> None:
        async for snapshot in snapshots:
            registry.update(snapshot)

    return registry, tasks.spawn(follow(), name="ca workload source")


async def kubernetes_ca_inputs(api_factory: Callable[[], client.ApiClient], *,
                               trust_domain: str, agent_service_account: tuple[str, str],
                               audience: str = DEFAULT_AUDIENCE,
                               backoff_max_s: float = 10.0) -> KubernetesCaInputs:
    # Pods only: "which identities run on which node" needs nothing else, so the
    # CA's RBAC is list/watch/get on pods and create on tokenreviews.
    source = KubernetesSource(api_factory, node="", trust_domain=trust_domain,
                              backoff_max_s=backoff_max_s, resources=(PODS,))
    registry, follower = await follow_registry(source)
    api = api_factory()
    namespace, name = agent_service_account
    authenticator = TokenReviewAuthenticator(api, agent_namespace=namespace,
                                             agent_service_account=name, audience=audience)
    return KubernetesCaInputs(registry, authenticator, follower, api)
