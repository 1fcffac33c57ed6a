"""The CA's HTTP API as a pure function of a parsed request: no sockets, no TLS.

    POST /v1/sign   Authorization: Bearer <node token>   {"csr": "<PEM>"}
        200 {"certificate_chain": ["<leaf PEM>"], "root": "<root PEM>"}
        400 malformed request or CSR    401 unknown node    403 refused by policy
        413 too large    429 over a rate or concurrency limit (Retry-After)
    GET /healthz    200 ok

    GET /metrics    Prometheus text: on the separate, plain-HTTP monitoring
                    listener only (``metrics_handle``), as istiod keeps its
                    15014 apart from the CA's 15012; never on the API port

Every signing decision is counted and logged here, in one place, so the log,
the metric label and the HTTP status can never disagree.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta

from cryptography.hazmat.primitives import serialization
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from identity.ca import CertificateAuthority, RefusalKind, SigningRefused, WorkloadRegistry
from identity.ca_limits import LimitReason, Refused
from identity.certs import identity_of_peer, load_pem_chain, split_pem_chain
from identity.http1 import HttpError, Request
from identity.node_auth import AuthenticationFailed, NodeAuthenticator

log = logging.getLogger("trellis.ca")

SIGN_PATH = "/v1/sign"
RESULTS = ("signed", "refused", "unauthenticated", "bad_request")


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class CaMetrics:
    """The CA's metrics, in a registry of their own (one per server, no globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.csr_total = Counter(
            "trellis_ca_csr", "Certificate signing requests by outcome.", ["result"],
            registry=self.registry)
        self.cert_lifetime = Gauge(
            "trellis_ca_cert_lifetime_seconds", "Lifetime of the workload certificates issued.",
            registry=self.registry)
        for result in RESULTS:  # export zeros, so rate() works from the first scrape
            self.csr_total.labels(result=result)
        self.limited = Counter(
            "trellis_ca_sign_limited", "Signing requests refused with 429 before any "
            "authentication, by the limit that refused them.", ["reason"],
            registry=self.registry)
        for reason in LimitReason:
            self.limited.labels(reason=reason.value)


class CaApi:
    def __init__(self, *, ca: CertificateAuthority, registry: WorkloadRegistry,
                 authenticator: NodeAuthenticator, lifetime: timedelta,
                 metrics: CaMetrics) -> None:
        self._ca = ca
        self._registry = registry
        self._authenticator = authenticator
        self._lifetime = lifetime
        self._metrics = metrics
        metrics.cert_lifetime.set(lifetime.total_seconds())

    def handle(self, request: Request, peer: str) -> ApiResponse:
        route = (request.method, request.target)
        if route == ("POST", SIGN_PATH):
            return self._sign(request, peer)
        if route == ("GET", "/healthz"):
            return ApiResponse(200, b"ok\n", "text/plain")
        if request.target in (SIGN_PATH, "/healthz"):
            return _error(405, f"{request.method} is not allowed on {request.target}")
        return _error(404, f"no such endpoint {request.target}")

    def metrics_handle(self, request: Request) -> ApiResponse:
        """The monitoring listener: ``GET /metrics`` and nothing else."""
        if (request.method, request.target) == ("GET", "/metrics"):
            return ApiResponse(200, generate_latest(self._metrics.registry), CONTENT_TYPE_LATEST)
        if request.target == "/metrics":
            return _error(405, f"{request.method} is not allowed on {request.target}")
        return _error(404, f"no such endpoint {request.target}")

    def limited(self, refused: Refused) -> ApiResponse:
        """A signing request turned away by ``identity.ca_limits`` before any work."""
        self._metrics.limited.labels(reason=refused.reason.value).inc()
        # Not logged per request: a flood would flood the log too; the metric counts.
        return _error(429, f"too many signing requests ({refused.reason.value}); retry later",
                      (("Retry-After", str(refused.retry_after_s)),))

    def reject_unparsed(self, error: HttpError, target: str | None, peer: str) -> ApiResponse:
        """Answer a request the HTTP parser refused (too large, malformed)."""
        if target == SIGN_PATH:
            self._decide("bad_request", peer=peer, reason=error.reason)
        return _error(error.status, error.reason)

    def _sign(self, request: Request, peer: str) -> ApiResponse:
        try:
            node = self._authenticator.authenticate(_bearer_token(request))
        except AuthenticationFailed as exc:
            self._decide("unauthenticated", peer=peer, reason=exc.reason)
            return _error(401, exc.reason, (("WWW-Authenticate", "Bearer"),))
        try:
            csr_pem = _csr_from_body(request.body)
            chain_pem = self._ca.sign_workload(
                csr_pem, node=node, registry=self._registry, lifetime=self._lifetime)
        except SigningRefused as exc:
            forbidden = exc.kind is RefusalKind.FORBIDDEN
            self._decide("refused" if forbidden else "bad_request", peer=peer, node=node,
                         identity=str(exc.identity) if exc.identity else None, reason=exc.reason)
            return _error(403 if forbidden else 400, exc.reason)
        leaf_der = load_pem_chain(chain_pem)[0].public_bytes(serialization.Encoding.DER)
        identity = identity_of_peer(leaf_der)
        self._decide("signed", peer=peer, node=node, identity=str(identity), reason=None)
        body = {"certificate_chain": split_pem_chain(chain_pem),
                "root": self._ca.root_pem.decode("ascii")}
        return ApiResponse(200, json.dumps(body).encode())

    def _decide(self, result: str, *, peer: str, reason: str | None,
                node: str | None = None, identity: str | None = None) -> None:
        self._metrics.csr_total.labels(result=result).inc()
        fields = {"node": node, "identity": identity, "result": result, "reason": reason,
                  "peer": peer}
        level = logging.INFO if result == "signed" else logging.WARNING
        log.log(level, "csr %s", result, extra={"fields": fields})


def _bearer_token(request: Request) -> str | None:
    value = request.header("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    # An Authorization header in another scheme is treated as no token at all.
    return token.strip() if scheme.lower() == "bearer" else None


def _csr_from_body(body: bytes) -> bytes:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the stack
        raise SigningRefused("request body is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("csr"), str):
        raise SigningRefused('request body must be a JSON object {"csr": "<PEM>"}')
    csr: str = payload["csr"]
    try:
        return csr.encode("utf-8")
    except UnicodeEncodeError:  # JSON can spell a lone surrogate ("\ud800"); UTF-8 cannot
        raise SigningRefused("CSR is not a PEM certificate request: not Unicode text") from None


def _error(status: int, reason: str,
           headers: tuple[tuple[str, str], ...] = ()) -> ApiResponse:
    return ApiResponse(status, json.dumps({"error": reason}).encode(), headers=headers)
