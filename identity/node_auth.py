"""Who is calling the CA: node agents authenticate with a per-node bearer token.

The CA stores only SHA-256 digests of the tokens, so reading its state does
not let anyone act as a node. Tokens are 256-bit random values, which is why a
plain hash (no salt, no slow KDF) is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

# Node names become file names (<tokens_dir>/<node>.token), so no slashes or dots at the ends.
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class AuthenticationFailed(Exception):
    """The caller is not a known node agent; `reason` says why (never echoes the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NodeAuthenticator(Protocol):
    def authenticate(self, token: str | None) -> str:
        """The node name the token belongs to, or raise `AuthenticationFailed`."""
        ...


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class StaticTokenAuthenticator:
    """The lab's authenticator: a fixed map node → sha256 hex of its token."""

    digests: Mapping[str, str]

    def __post_init__(self) -> None:
        for node, digest in self.digests.items():
            _check_node_name(node)
            if not _SHA256_HEX.fullmatch(digest):
                raise ValueError(f"token digest for node {node!r} is not 64 lowercase hex digits")
        # Freeze the mapping too, so the dataclass is immutable all the way down.
        object.__setattr__(self, "digests", MappingProxyType(dict(self.digests)))

    @classmethod
    def from_file(cls, digest_file: Path) -> StaticTokenAuthenticator:
        try:
            data = json.loads(digest_file.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{digest_file}: cannot read node token digests: {exc}") from exc
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError(f"{digest_file}: expected a JSON object of node name → sha256 hex")
        try:
            return cls(data)
        except ValueError as exc:
            raise ValueError(f"{digest_file}: {exc}") from exc

    def authenticate(self, token: str | None) -> str:
        if not token:
            raise AuthenticationFailed("no bearer token")
        presented = token_digest(token)
        # Compare against every node, in constant time per comparison, and
        # never stop early: timing says nothing about which node almost matched.
        matched = [node for node, digest in self.digests.items()
                   if hmac.compare_digest(presented, digest)]
        if not matched:
            raise AuthenticationFailed("bearer token matches no node")
        return matched[0]


def issue_node_tokens(nodes: Iterable[str], tokens_dir: Path, digest_file: Path) -> dict[str, str]:
    """Make sure each node has a token file and write the CA's digest file; returns the digests.

    Idempotent: an existing `<node>.token` is kept, so re-running the lab set-up
    does not lock out agents that already read their token. The digest file
    lists exactly `nodes`.
    """
    tokens_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    digests: dict[str, str] = {}
    for node in nodes:
        _check_node_name(node)
        path = tokens_dir / f"{node}.token"
        if path.exists():
            token = path.read_text().strip()
            if not token:
                raise ValueError(f"{path} is empty; remove it to issue a new token")
        else:
            token = secrets.token_urlsafe(32)
            _write_private(path, token + "\n")
        digests[node] = token_digest(token)
    _write_private(digest_file, json.dumps(digests, indent=2, sort_keys=True) + "\n")
    return digests


def read_token(path: Path) -> str:
    """A node agent's token file, stripped; a clear error if it is missing or empty."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read node token {path}: {exc}") from exc
    if not token:
        raise ValueError(f"node token file {path} is empty")
    return token


def _check_node_name(node: str) -> None:
    if not _NODE_NAME.fullmatch(node):
        raise ValueError(f"node name {node!r} must be lowercase letters, digits, '-' or '.'")


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from creation on, replacing atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.replace(tmp, path)
