from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity.spiffe import Identity, InvalidIdentity

pytestmark = pytest.mark.unit

labels = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True)
trust_domains = st.from_regex(r"[a-z0-9]([-a-z0-9._]{0,20}[a-z0-9])?", fullmatch=True)


@given(trust_domains, labels, labels)
def test_print_then_parse_is_identity(domain: str, ns: str, sa: str) -> None:
    identity = Identity(domain, ns, sa)
    assert Identity.parse(identity.uri) == identity
    assert Identity.parse(identity.uri).uri == f"spiffe://{domain}/ns/{ns}/sa/{sa}"


def test_parse_fields_and_principal() -> None:
    identity = Identity.parse("spiffe://cluster.local/ns/demo/sa/backend")
    assert (identity.trust_domain, identity.namespace, identity.service_account) == (
        "cluster.local", "demo", "backend")
    assert identity.principal == "cluster.local/ns/demo/sa/backend"
    assert str(identity) == "spiffe://cluster.local/ns/demo/sa/backend"
    assert Identity.of("demo", "backend") == identity


@pytest.mark.parametrize(("uri", "names"), [
    ("https://cluster.local/ns/demo/sa/backend", "spiffe://"),
    ("cluster.local/ns/demo/sa/backend", "spiffe://"),
    ("spiffe:///ns/demo/sa/backend", "trust domain"),
    ("spiffe://Cluster.Local/ns/demo/sa/backend", "trust domain"),
    ("spiffe://cluster.local", "path"),
    ("spiffe://cluster.local/ns/demo", "path"),
    ("spiffe://cluster.local/ns/demo/sa/backend/", "path"),
    ("spiffe://cluster.local/ns/demo/sa/backend/extra", "path"),
    ("spiffe://cluster.local/ns/Demo/sa/backend", "path"),
    ("spiffe://cluster.local/sa/backend/ns/demo", "path"),
    ("spiffe://cluster.local/ns//sa/backend", "path"),
    ("", "spiffe://"),
    # `$` also matches before a final newline: these parsed as backend and
    # cluster.local, so the CA signed ".../sa/backend" for a CSR that asked for
    # ".../sa/backend\n" (found with tests/fuzz/fuzz_ca_csr.py's invariant).
    ("spiffe://cluster.local/ns/demo/sa/backend\n", "path"),
    ("spiffe://cluster.local\n/ns/demo/sa/backend", "trust domain"),
])
def test_parse_rejects_with_a_message_naming_the_part(uri: str, names: str) -> None:
    with pytest.raises(InvalidIdentity, match=names):
        Identity.parse(uri)


@given(st.text(max_size=60))
def test_parse_either_round_trips_or_raises_invalid_identity(text: str) -> None:
    try:
        identity = Identity.parse(text)
    except InvalidIdentity:
        return
    assert identity.uri == text
