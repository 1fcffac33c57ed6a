"""Fuzz the AuthorizationPolicy loader and what the node does with its result.

Input: the text of a policy file (``trellis policy check -f``, the objects a
node agent reads): multi-document YAML. Reading it never raises: a problem is
a ``Problem`` naming the policy and field, and an invalid policy gets a
fail-closed stand-in (policy/sources.py, loader.py, compile.py, fields.py,
failclosed.py). Then the result is enforced twice (as a fresh node, and with
the memory of the first load), indexed, and one plaintext and one mTLS
connection are decided through the index and through a plain list, which must
agree.
"""

from __future__ import annotations

from policy import ConnectionFacts, PolicyIndex, enforce, evaluate, load_yaml

ALLOWED: tuple[type[BaseException], ...] = ()
MAX_LEN = 8192

_CONNECTIONS = tuple(
    ConnectionFacts(source_principal=principal, source_ip="10.0.1.5", source_namespace=None,
                    dest_namespace=namespace, dest_labels={"app": "backend"},
                    dest_ip="10.0.2.7", dest_port=8080)
    for principal in (None, "spiffe://cluster.local/ns/demo/sa/frontend")
    for namespace in ("demo", "default"))


def one_input(data: bytes) -> None:
    result = load_yaml([("fuzz.yaml", data.decode("utf-8", errors="replace"))])
    assert all(p.errors for p in result.invalid)
    first = enforce(result)
    again = enforce(result, first.last_valid)
    assert {p.key for p in again.policies} == {p.key for p in first.policies}
    index = PolicyIndex.build(first.policies)
    for facts in _CONNECTIONS:
        assert evaluate(facts, index) == evaluate(facts, list(first.policies))
