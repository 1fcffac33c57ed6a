"""Ask the CA for a workload certificate over HTTPS (stdlib asyncio streams + ssl).

The CA's serving certificate is verified against the mesh root we were given,
never the system trust store: only our CA may sign our workloads.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from identity.ca_api import SIGN_PATH
from identity.certs import (
    CertBundle,
    PeerIdentityError,
    build_csr,
    generate_key,
    load_pem_chain,
    private_key_pem,
    spki,
)
from identity.http1 import HttpError, parse_response, render_request
from identity.spiffe import Identity

MAX_RESPONSE = 1024 * 1024
DEFAULT_TIMEOUT = 10.0


class CertificateRequestFailed(Exception):
    """The CA did not give us a certificate.

    `status` is the HTTP status the CA answered, or None if we never got an
    answer (connection, TLS or timeout); `reason` is the CA's error text or
    what went wrong on the way.
    """

    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(f"{status}: {reason}" if status is not None else reason)
        self.status = status
        self.reason = reason


async def request_certificate(*, ca_url: str, ca_root_pem: bytes, token: str,
                              identity: Identity, key: ec.EllipticCurvePrivateKey | None = None,
                              server_name: str | None = None,
                              timeout: float = DEFAULT_TIMEOUT) -> CertBundle:
    """A fresh certificate for `identity`, signed by the CA at `ca_url` (https://host:port).

    `server_name` is the name to verify the CA's certificate against; by
    default the URL's host (the CA's certificate names its IP and `trellis-ca`).
    """
    host, port = _split_url(ca_url)
    key = key or generate_key()
    body = json.dumps({"csr": build_csr(key, identity).decode("ascii")}).encode()
    request = render_request("POST", SIGN_PATH, host=f"{host}:{port}", body=body, headers=(
        ("Authorization", f"Bearer {token}"), ("Content-Type", "application/json")))
    raw = await _exchange(ca_url, host, port, _client_context(ca_root_pem),
                          server_name or host, request, timeout)
    return read_answer(raw, key=key, identity=identity, ca_url=ca_url)


def read_answer(raw: bytes, *, key: ec.EllipticCurvePrivateKey, identity: Identity,
                ca_url: str) -> CertBundle:
    """The CA's whole answer (read to EOF) → our bundle, or `CertificateRequestFailed`.
    Sans-IO, so the fuzz target (tests/fuzz/fuzz_ca_client.py) reads it as we do."""
    try:
        response = parse_response(raw, max_body=MAX_RESPONSE)
    except HttpError as exc:
        raise CertificateRequestFailed(None, f"CA at {ca_url} sent a bad response: "
                                             f"{exc.reason}") from None
    if response.status != 200:
        raise CertificateRequestFailed(response.status, _error_text(response.body))
    return _bundle_from(response.body, key, identity, ca_url)


async def _exchange(ca_url: str, host: str, port: int, context: ssl.SSLContext,
                    server_name: str, request: bytes, timeout: float) -> bytes:
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=server_name)
            writer.write(request)
            await writer.drain()
            # The CA answers once and closes (Connection: close): read to EOF.
            chunks: list[bytes] = []
            received = 0
            while chunk := await reader.read(65536):
                received += len(chunk)
                if received > MAX_RESPONSE:
                    raise CertificateRequestFailed(
                        None, f"CA at {ca_url} sent more than {MAX_RESPONSE} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise CertificateRequestFailed(
            None, f"CA at {ca_url} did not answer within {timeout}s") from None
    except ssl.SSLCertVerificationError as exc:
        raise CertificateRequestFailed(
            None, f"CA at {ca_url} is not trusted: {exc.verify_message}") from None
    except (OSError, ssl.SSLError) as exc:
        raise CertificateRequestFailed(None, f"cannot reach CA at {ca_url}: {exc}") from None
    finally:
        if writer is not None:
            writer.close()
    return b"".join(chunks)


def _client_context(ca_root_pem: bytes) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cadata=ca_root_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"ca_root_pem is not a PEM certificate: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def _split_url(ca_url: str) -> tuple[str, int]:
    parts = urlsplit(ca_url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"ca_url {ca_url!r} must look like https://<host>:<port>")
    try:
        return parts.hostname, parts.port or 443
    except ValueError:
        raise ValueError(f"ca_url {ca_url!r} has an invalid port") from None


def _error_text(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return body[:200].decode("utf-8", "replace") or "(empty response)"
    return str(error)


def _bundle_from(body: bytes, key: ec.EllipticCurvePrivateKey, identity: Identity,
                 ca_url: str) -> CertBundle:
    try:
        payload = json.loads(body)
        chain = "".join(payload["certificate_chain"]).encode("ascii")
        root = str(payload["root"]).encode("ascii")
        bundle = CertBundle.from_pem(chain_pem=chain, key_pem=private_key_pem(key),
                                     root_pem=root, expected=identity)
    except (ValueError, KeyError, TypeError, RecursionError, PeerIdentityError) as exc:
        raise CertificateRequestFailed(
            200, f"CA at {ca_url} answered with an unusable certificate: {exc}") from None
    # The CA must sign *our* key: a leaf for another key would be useless to us.
    try:
        leaf_key = load_pem_chain(chain)[0].public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateRequestFailed(
            200, f"CA at {ca_url} answered with a certificate of unusable key: {exc}") from None
    if spki(leaf_key) != spki(key.public_key()):
        raise CertificateRequestFailed(
            200, f"CA at {ca_url} returned a certificate for a different key")
    return bundle
