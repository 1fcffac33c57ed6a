"""The CA's node authenticator on Kubernetes: projected service-account tokens,
checked by the API server's TokenReview.

A node agent presents the token the kubelet projects into its pod (audience
``trellis-ca``, rotated by the kubelet; the agent re-reads it per request). The
CA accepts it only when TokenReview says it is authenticated, for the audience,
and for the agent's own service account (``system:serviceaccount:<ns>:<sa>``): a
workload's token, or the agent's token for another audience, gets nothing.

The caller's node comes from the pod the token is bound to, never from anything
the caller says:

- ``status.user.extra["authentication.kubernetes.io/node-name"]``: the API server
  writes the node into bound tokens (Kubernetes 1.30+, on by default) and
  reports it here; taking it costs no extra request, and it is the node the
  pod was on when the token was issued, which is the node the kubelet that
  projected it runs on.
- Otherwise the token's ``pod-name``/``pod-uid`` extras are looked up (``GET`` the
  pod) and ``spec.nodeName`` is taken, after checking the UID, so a token of a
  deleted pod whose name was reused elsewhere does not carry over.
- A token bound to no pod (a legacy Secret token) is refused: it names no node.

identity/ holds no Kubernetes code; this adapter implements its
``NodeAuthenticator`` protocol. That protocol is synchronous and the CA server calls
it off the event loop, so ``authenticate`` hands the request to the loop that owns
the API client and waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client

from identity.node_auth import AuthenticationFailed
from nodeagent.k8s_client import get_json, post_json
from nodeagent.k8s_reflector import CONNECTION_ERRORS
from nodeagent.k8s_watch import WatchFailed

TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
NODE_NAME = "authentication.kubernetes.io/node-name"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
DEFAULT_AUDIENCE = "trellis-ca"


@dataclass(frozen=True, slots=True)
class BoundPod:
    namespace: str
    name: str
    uid: str


def _mapping(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


def _first(extra: Mapping[str, Any], key: str) -> str:
    values = extra.get(key)
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0]
    return ""


def review_outcome(status: Mapping[str, Any], *, username: str,
                   audience: str) -> str | BoundPod:
    """A TokenReview ``status`` → the caller's node, or the pod to look it up from.
    Raises ``AuthenticationFailed`` saying why it is refused."""
    if status.get("authenticated") is not True:
        raise AuthenticationFailed(f"token rejected by TokenReview: "
                                   f"{status.get('error') or 'not authenticated'}")
    audiences = status.get("audiences")
    if audience and (not isinstance(audiences, list) or audience not in audiences):
        raise AuthenticationFailed(f"token is not for audience {audience!r}")
    user = _mapping(status, "user")
    if user.get("username") != username:
        raise AuthenticationFailed(f"token belongs to {user.get('username')!r}, "
                                   f"not the node agent {username!r}")
    extra = _mapping(user, "extra")
    if node := _first(extra, NODE_NAME):
        return node
    pod, uid = _first(extra, POD_NAME), _first(extra, POD_UID)
    if not pod or not uid:
        raise AuthenticationFailed("token is not bound to a pod, so it names no node")
    return BoundPod(username.split(":")[2], pod, uid)


def node_of_pod(pod: Mapping[str, Any], bound: BoundPod) -> str:
    meta = _mapping(pod, "metadata")
    if meta.get("uid") != bound.uid:
        raise AuthenticationFailed(f"pod {bound.namespace}/{bound.name} the token was bound "
                                   "to no longer exists")
    spec = _mapping(pod, "spec")
    node = spec.get("nodeName")
    if not isinstance(node, str) or not node:
        raise AuthenticationFailed(f"pod {bound.namespace}/{bound.name} is on no node")
    return node


class TokenReviewAuthenticator:
    """identity.node_auth.NodeAuthenticator over the TokenReview API."""

    def __init__(self, api: client.ApiClient, *, agent_namespace: str,
                 agent_service_account: str, audience: str = DEFAULT_AUDIENCE,
                 timeout_s: float = 5.0) -> None:
        self._api = api
        self._loop = asyncio.get_running_loop()  # the loop that owns the API client
        self.username = f"system:serviceaccount:{agent_namespace}:{agent_service_account}"
        self.audience = audience
        self.timeout_s = timeout_s

    def authenticate(self, token: str | None) -> str:
        if not token:
            raise AuthenticationFailed("no bearer token")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("TokenReviewAuthenticator.authenticate blocks: call it "
                               "off the event loop (the CA server does)")
        future = asyncio.run_coroutine_threadsafe(self.review(token), self._loop)
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            future.cancel()
            raise AuthenticationFailed("TokenReview timed out") from None

    async def review(self, token: str) -> str:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.audience]}}
        try:
            answer = await post_json(self._api, TOKENREVIEWS, body)
            outcome = review_outcome(answer.get("status") or {}, username=self.username,
                                     audience=self.audience)
            if isinstance(outcome, str):
                return outcome
            path = f"/api/v1/namespaces/{outcome.namespace}/pods/{outcome.name}"
            try:
                pod = await get_json(self._api, path)
            except WatchFailed as exc:
                if exc.code == 404:
                    raise AuthenticationFailed(f"pod {outcome.namespace}/{outcome.name} the "
                                               "token was bound to no longer exists") from None
                raise
            return node_of_pod(pod, outcome)
        except (WatchFailed, *CONNECTION_ERRORS) as exc:
            # Fail closed: no answer from the API server is no authentication.
            raise AuthenticationFailed(f"TokenReview unavailable: {exc}") from exc
