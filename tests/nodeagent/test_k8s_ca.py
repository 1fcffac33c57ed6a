"""The CA on Kubernetes: node agents authenticate with service-account tokens checked
by TokenReview (the API-server stand-in), and get only identities that run on
their node according to the API server's pods."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from fake_apiserver import FakeApiServer
from k8s_support import NAMESPACES, PODS, api_factory, namespace, pod, write_kubeconfig

from identity.ca import CertificateAuthority
from identity.ca_client import CertificateRequestFailed, request_certificate
from identity.ca_server import CaServer, CaServerConfig, serve_ca
from identity.node_auth import AuthenticationFailed
from identity.spiffe import Identity
from nodeagent.ca_k8s import kubernetes_ca_inputs
from nodeagent.k8s_auth import BoundPod, review_outcome

pytestmark = pytest.mark.inprocess

AGENT = "system:serviceaccount:trellis-system:trellis-agent"
WEB = Identity.of("demo", "web")
DB = Identity.of("demo", "db")


def _status(username: str = AGENT, *, audiences: tuple[str, ...] = ("trellis-ca",),
            **extra: str) -> dict[str, object]:
    return {"authenticated": True, "audiences": list(audiences),
            "user": {"username": username,
                     "extra": {f"authentication.kubernetes.io/{k.replace('_', '-')}": [v]
                               for k, v in extra.items()}}}


TOKENS = {
    # Bound token of the agent pod on node-1; the API server names the node.
    "agent-node-1": _status(node_name="node-1", pod_name="agent-a", pod_uid="uid-agent-a"),
    # An older API server: only the pod, which the CA looks up.
    "agent-node-2-old-apiserver": _status(pod_name="agent-b", pod_uid="uid-agent-b"),
    "workload-token": _status("system:serviceaccount:demo:web", node_name="node-1"),
    "agent-wrong-audience": _status(audiences=("https://kubernetes.default.svc",),
                                    node_name="node-1"),
    "agent-legacy-secret": _status(),
}


def run(tmp_path: Path, scenario: Callable[[CaServer, CertificateAuthority, FakeApiServer],
                                            Awaitable[None]]) -> None:
    async def main() -> None:
        api = FakeApiServer(tokens=dict(TOKENS))
        await api.start()
        await api.apply(NAMESPACES, namespace("demo"))
        await api.apply(PODS, pod("web-1", "10.1.0.11", node="node-1", sa="web"))
        await api.apply(PODS, pod("db-2", "10.2.0.11", node="node-2", sa="db"))
        await api.apply(PODS, pod("agent-b", "10.2.0.2", node="node-2", ns="trellis-system",
                                  sa="trellis-agent"))
        factory = await api_factory(write_kubeconfig(tmp_path / "kubeconfig", api))
        inputs = await kubernetes_ca_inputs(
            factory, trust_domain="cluster.local",
            agent_service_account=("trellis-system", "trellis-agent"))
        ca = CertificateAuthority.create()
        config = CaServerConfig(host="127.0.0.1", port=0, lifetime=timedelta(hours=1))
        try:
            async with await serve_ca(config, ca, inputs.registry, inputs.authenticator) as srv:
                await scenario(srv, ca, api)
        finally:
            await inputs.close()
            await api.stop()

    asyncio.run(main())


async def ask(server: CaServer, ca: CertificateAuthority, token: str, identity: Identity):  # type: ignore[no-untyped-def]
    return await request_certificate(ca_url=server.url, ca_root_pem=ca.root_pem,
                                     token=token, identity=identity)


async def refused(server: CaServer, ca: CertificateAuthority, token: str,
                  identity: Identity) -> CertificateRequestFailed:
    with pytest.raises(CertificateRequestFailed) as caught:
        await ask(server, ca, token, identity)
    return caught.value


def test_agent_token_gets_an_identity_that_runs_on_its_node(tmp_path: Path) -> None:
    async def scenario(server: CaServer, ca: CertificateAuthority, api: FakeApiServer) -> None:
        bundle = await ask(server, ca, "agent-node-1", WEB)
        assert bundle.identity == WEB
        # Without the node-name extra the CA looks up the bound pod's node.
        assert (await ask(server, ca, "agent-node-2-old-apiserver", DB)).identity == DB
        assert api.requests.count("POST /apis/authentication.k8s.io/v1/tokenreviews") == 2
        # The CA watches pods and nothing else (its RBAC can be that narrow).
        assert {r.split("?")[0] for r in api.requests if r.startswith("GET")} == {
            "GET /api/v1/pods"}

    run(tmp_path, scenario)


def test_token_that_tokenreview_rejects(tmp_path: Path) -> None:
    async def scenario(server: CaServer, ca: CertificateAuthority, api: FakeApiServer) -> None:
        failure = await refused(server, ca, "forged-token", WEB)
        assert failure.status == 401 and "rejected by TokenReview" in str(failure)

    run(tmp_path, scenario)


def test_valid_node_token_asking_for_an_identity_with_no_pod_on_its_node(tmp_path: Path) -> None:
    async def scenario(server: CaServer, ca: CertificateAuthority, api: FakeApiServer) -> None:
        # db runs only on node-2; the node-1 agent may not have it.
        failure = await refused(server, ca, "agent-node-1", DB)
        assert failure.status == 403
        failure = await refused(server, ca, "agent-node-1", Identity.of("demo", "nobody"))
        assert failure.status == 403

    run(tmp_path, scenario)


def test_request_with_no_token(tmp_path: Path) -> None:
    async def scenario(server: CaServer, ca: CertificateAuthority, api: FakeApiServer) -> None:
        failure = await refused(server, ca, "", WEB)
        assert failure.status == 401 and "no bearer token" in str(failure)
        # Refused before any TokenReview: an anonymous caller costs the API server nothing.
        assert "POST /apis/authentication.k8s.io/v1/tokenreviews" not in api.requests

    run(tmp_path, scenario)


def test_tokens_of_workloads_other_audiences_or_no_pod_are_refused(tmp_path: Path) -> None:
    async def scenario(server: CaServer, ca: CertificateAuthority, api: FakeApiServer) -> None:
        for token, why in (("workload-token", "not the node agent"),
                           ("agent-wrong-audience", "audience"),
                           ("agent-legacy-secret", "not bound to a pod")):
            failure = await refused(server, ca, token, WEB)
            assert failure.status == 401 and why in str(failure), token

    run(tmp_path, scenario)


def test_api_server_down_fails_closed(tmp_path: Path) -> None:
    async def scenario(server: CaServer, ca: CertificateAuthority, api: FakeApiServer) -> None:
        await api.stop()
        failure = await refused(server, ca, "agent-node-1", WEB)
        assert failure.status == 401 and "TokenReview unavailable" in str(failure)

    run(tmp_path, scenario)


def test_review_outcome_rules() -> None:
    assert review_outcome(_status(node_name="n1"), username=AGENT, audience="trellis-ca") == "n1"
    assert review_outcome(_status(pod_name="p", pod_uid="u"), username=AGENT,
                          audience="trellis-ca") == BoundPod("trellis-system", "p", "u")
    with pytest.raises(AuthenticationFailed, match="rejected"):
        review_outcome({"authenticated": False, "error": "expired"}, username=AGENT,
                       audience="trellis-ca")


def test_a_finished_pod_gives_its_node_no_certificate(tmp_path: Path) -> None:
    """Placements come from pods that run: once the API server says a pod Succeeded,
    its node may no longer get its identity (the IP and the slot may be reused)."""
    batch = Identity.of("demo", "batch")

    async def scenario(server: CaServer, ca: CertificateAuthority, api: FakeApiServer) -> None:
        job = pod("batch-1", "10.1.0.12", node="node-1", sa="batch")
        job["status"]["phase"] = "Running"
        await api.apply(PODS, job)
        deadline = asyncio.get_running_loop().time() + 5
        while True:  # the control: while it runs, its node gets its identity
            try:
                assert (await ask(server, ca, "agent-node-1", batch)).identity == batch
                break
            except CertificateRequestFailed:
                assert asyncio.get_running_loop().time() < deadline, "the pod never arrived"
                await asyncio.sleep(0.05)
        job["status"]["phase"] = "Succeeded"
        await api.apply(PODS, job)
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            try:
                await ask(server, ca, "agent-node-1", batch)
            except CertificateRequestFailed as failure:
                assert failure.status == 403
                break
            assert asyncio.get_running_loop().time() < deadline, "still signed after Succeeded"
            await asyncio.sleep(0.1)  # well inside the CA's per-source rate limit

    run(tmp_path, scenario)
