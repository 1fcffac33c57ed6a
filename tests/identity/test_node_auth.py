from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from identity.node_auth import (
    AuthenticationFailed,
    StaticTokenAuthenticator,
    issue_node_tokens,
    read_token,
    token_digest,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def issued(tmp_path: Path) -> tuple[Path, Path]:
    tokens, digests = tmp_path / "tokens", tmp_path / "ca" / "node-tokens.json"
    issue_node_tokens(["node-1", "node-2"], tokens, digests)
    return tokens, digests


def test_right_token_names_its_node(issued: tuple[Path, Path]) -> None:
    tokens, digests = issued
    auth = StaticTokenAuthenticator.from_file(digests)
    assert auth.authenticate(read_token(tokens / "node-1.token")) == "node-1"
    assert auth.authenticate(read_token(tokens / "node-2.token")) == "node-2"


@pytest.mark.parametrize(("token", "reason"), [
    (None, "no bearer token"), ("", "no bearer token"), ("guess", "bearer token matches no node")])
def test_missing_or_wrong_token_is_refused(issued: tuple[Path, Path], token: str | None,
                                           reason: str) -> None:
    auth = StaticTokenAuthenticator.from_file(issued[1])
    with pytest.raises(AuthenticationFailed) as caught:
        auth.authenticate(token)
    assert caught.value.reason == reason


def test_the_ca_stores_digests_not_tokens(issued: tuple[Path, Path]) -> None:
    tokens, digests = issued
    stored = json.loads(digests.read_text())
    token = read_token(tokens / "node-1.token")
    assert stored["node-1"] == token_digest(token)
    assert token not in digests.read_text()
    assert len(token) >= 40, "tokens carry at least 256 bits"


def test_token_files_are_private(issued: tuple[Path, Path]) -> None:
    tokens, digests = issued
    for path in (tokens / "node-1.token", tokens / "node-2.token", digests):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_issuing_again_keeps_tokens_and_adds_new_nodes(issued: tuple[Path, Path]) -> None:
    tokens, digests = issued
    before = read_token(tokens / "node-1.token")
    result = issue_node_tokens(["node-1", "node-3"], tokens, digests)
    assert read_token(tokens / "node-1.token") == before
    assert set(result) == {"node-1", "node-3"}
    auth = StaticTokenAuthenticator.from_file(digests)
    assert auth.authenticate(read_token(tokens / "node-3.token")) == "node-3"
    with pytest.raises(AuthenticationFailed):  # node-2 is no longer listed
        auth.authenticate(read_token(tokens / "node-2.token"))


def test_tokens_differ_per_node(issued: tuple[Path, Path]) -> None:
    tokens, _ = issued
    assert read_token(tokens / "node-1.token") != read_token(tokens / "node-2.token")


@pytest.mark.parametrize("node", ["../etc", "Node-1", "", "-x", "node-1\n"])
def test_unsafe_node_names_are_refused(tmp_path: Path, node: str) -> None:
    with pytest.raises(ValueError, match="node name"):
        issue_node_tokens([node], tmp_path / "t", tmp_path / "d.json")


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "cannot read node token digests"),
    ('["node-1"]', "expected a JSON object"),
    ('{"node-1": "abc"}', "not 64 lowercase hex digits"),
    ('{"node-1": "' + "a" * 64 + '\\n"}', "not 64 lowercase hex digits"),
])
def test_bad_digest_files_are_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "digests.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        StaticTokenAuthenticator.from_file(path)
    assert str(path) in str(caught.value)


def test_authenticator_mapping_is_frozen() -> None:
    auth = StaticTokenAuthenticator({"node-1": token_digest("t")})
    with pytest.raises(TypeError):
        auth.digests["node-2"] = token_digest("u")  # type: ignore[index]
