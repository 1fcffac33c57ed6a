"""Table: every field and its not-form, each match kind, scopes, order, AUDIT, CUSTOM, L7.

Each case names the decision, the policy that decided and its rule (None for
both when no single policy decided). Facts default to frontend
(spiffe://cluster.local/ns/demo/sa/frontend, 10.0.1.5) → demo backend
(app=backend, version=v1) at 10.0.2.7:8080.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from policy_support import (
    ROOT,
    Doc,
    allow,
    audit,
    cond,
    decide,
    deny,
    facts,
    op,
    policy,
    rule,
    src,
)

from policy import ConnectionFacts

pytestmark = pytest.mark.unit

LEGACY = "spiffe://cluster.local/ns/legacy/sa/client"
OTHER_TD = "spiffe://other.example/ns/demo/sa/frontend"
PROD_FRONTEND = "spiffe://cluster.local/ns/prod/sa/frontend"
PLAIN = None


@dataclass(frozen=True)
class Case:
    id: str
    docs: tuple[Doc, ...]
    conn: ConnectionFacts
    decision: str  # "ALLOW" or "DENY"
    policy: str | None
    rule: int | None
    reason: str | None = None
    audit: tuple[str, ...] = ()


def c(id: str, docs: list[Doc] | Doc, conn: ConnectionFacts, decision: str,
      policy: str | None = None, rule: int | None = None, reason: str | None = None,
      audit: tuple[str, ...] = ()) -> Case:
    return Case(id, tuple(docs) if isinstance(docs, list) else (docs,), conn, decision,
                policy, rule, reason, audit)


def from_(**fields: list[str]) -> Doc:
    return rule(frm=[src(**fields)])


def to(**fields: list[str]) -> Doc:
    return rule(to=[op(**fields)])


def when(*conditions: Doc) -> Doc:
    return rule(when=list(conditions))


def custom(name: str, *rules: Doc) -> Doc:
    doc = policy(name, *rules, action="CUSTOM")
    doc["spec"]["provider"] = {"name": "ext-authz"}
    return doc


A, D = "ALLOW", "DENY"
OK_P, NO_MATCH, NONE, DENIED = ("allowed_by_policy", "no_allow_match", "no_policy",
                                "denied_by_policy")

CASES = [
    # --- principals: exact, prefix, suffix, presence; plaintext never matches
    c("principals-exact", allow("p", from_(principals=["cluster.local/ns/demo/sa/frontend"])),
      facts(), A, "demo/p", 0, OK_P),
    c("principals-exact-miss", allow("p", from_(principals=["cluster.local/ns/demo/sa/other"])),
      facts(), D, None, None, NO_MATCH),
    c("principals-prefix", allow("p", from_(principals=["cluster.local/ns/demo/*"])),
      facts(), A, "demo/p", 0),
    c("principals-prefix-miss", allow("p", from_(principals=["cluster.local/ns/prod/*"])),
      facts(), D),
    c("principals-suffix", allow("p", from_(principals=["*/sa/frontend"])), facts(), A,
      "demo/p", 0),
    c("principals-suffix-miss", allow("p", from_(principals=["*/sa/backend"])), facts(), D),
    c("principals-presence-mtls", allow("p", from_(principals=["*"])), facts(), A, "demo/p", 0),
    c("principals-presence-plaintext", allow("p", from_(principals=["*"])),
      facts(principal=PLAIN), D, None, None, NO_MATCH),
    c("principals-exact-plaintext", allow("p", from_(principals=["cluster.local/ns/demo/*"])),
      facts(principal=PLAIN), D),
    c("principals-with-scheme-never-match",
      allow("p", from_(principals=["spiffe://cluster.local/ns/demo/sa/frontend"])), facts(), D),
    c("principals-any-of",
      allow("p", from_(principals=["a/b", "cluster.local/ns/demo/sa/frontend"])),
      facts(), A, "demo/p", 0),
    c("notPrincipals-other-peer", allow("p", from_(notPrincipals=["cluster.local/ns/legacy/*"])),
      facts(), A, "demo/p", 0),
    c("notPrincipals-listed-peer", allow("p", from_(notPrincipals=["cluster.local/ns/legacy/*"])),
      facts(principal=LEGACY), D, None, None, NO_MATCH),
    c("strict-mtls-denies-plaintext", deny("strict", from_(notPrincipals=["*"]), namespace=ROOT),
      facts(principal=PLAIN), D, f"{ROOT}/strict", 0, DENIED),
    c("strict-mtls-lets-mtls-through", deny("strict", from_(notPrincipals=["*"]), namespace=ROOT),
      facts(), A, None, None, NONE),
    # --- namespaces (read from the peer identity)
    c("namespaces-exact", allow("p", from_(namespaces=["demo"])), facts(), A, "demo/p", 0),
    c("namespaces-miss", allow("p", from_(namespaces=["prod"])), facts(), D, None, None, NO_MATCH),
    c("namespaces-prefix", allow("p", from_(namespaces=["de*"])), facts(), A, "demo/p", 0),
    c("namespaces-suffix", allow("p", from_(namespaces=["*mo"])), facts(), A, "demo/p", 0),
    c("namespaces-presence-plaintext", allow("p", from_(namespaces=["*"])),
      facts(principal=PLAIN, source_namespace="demo"), D),
    c("namespaces-ignore-claimed-source-namespace", allow("p", from_(namespaces=["prod"])),
      facts(source_namespace="prod"), D),
    c("notNamespaces-other", allow("p", from_(notNamespaces=["legacy"])), facts(), A, "demo/p", 0),
    c("notNamespaces-listed", allow("p", from_(notNamespaces=["legacy"])),
      facts(principal=LEGACY), D),
    c("notNamespaces-plaintext-has-none", allow("p", from_(notNamespaces=["legacy"])),
      facts(principal=PLAIN), A, "demo/p", 0),
    # --- serviceAccounts: ns/sa, or sa in the policy's namespace; exact only
    c("serviceAccounts-ns-sa", allow("p", from_(serviceAccounts=["demo/frontend"])),
      facts(), A, "demo/p", 0),
    c("serviceAccounts-short-form", allow("p", from_(serviceAccounts=["frontend"])),
      facts(), A, "demo/p", 0),
    c("serviceAccounts-short-form-other-ns", allow("p", from_(serviceAccounts=["frontend"])),
      facts(principal=PROD_FRONTEND), D),
    c("serviceAccounts-short-form-root-policy",
      allow("p", from_(serviceAccounts=["frontend"]), namespace=ROOT), facts(), D),
    c("serviceAccounts-any-trust-domain", allow("p", from_(serviceAccounts=["demo/frontend"])),
      facts(principal=OTHER_TD), A, "demo/p", 0),
    c("serviceAccounts-plaintext", allow("p", from_(serviceAccounts=["demo/frontend"])),
      facts(principal=PLAIN), D),
    c("notServiceAccounts-listed", allow("p", from_(notServiceAccounts=["demo/frontend"])),
      facts(), D),
    c("notServiceAccounts-other", allow("p", from_(notServiceAccounts=["legacy/client"])),
      facts(), A, "demo/p", 0),
    # --- trustDomains (from the certificate, like principals)
    c("trustDomains-exact", allow("p", from_(trustDomains=["cluster.local"])),
      facts(), A, "demo/p", 0),
    c("trustDomains-miss", allow("p", from_(trustDomains=["cluster.local"])),
      facts(principal=OTHER_TD), D),
    c("notTrustDomains-suffix", allow("p", from_(notTrustDomains=["*.example"])),
      facts(principal=OTHER_TD), D),
    # --- ipBlocks: single IPs and CIDRs
    c("ipBlocks-single", allow("p", from_(ipBlocks=["10.0.1.5"])), facts(), A, "demo/p", 0),
    c("ipBlocks-cidr", allow("p", from_(ipBlocks=["10.0.0.0/16"])), facts(), A, "demo/p", 0),
    c("ipBlocks-cidr-miss", allow("p", from_(ipBlocks=["10.1.0.0/16"])), facts(), D),
    c("ipBlocks-host-bits", allow("p", from_(ipBlocks=["10.0.1.99/24"])), facts(), A, "demo/p", 0),
    c("ipBlocks-ipv6", allow("p", from_(ipBlocks=["fd00::/64"])),
      facts(source_ip="fd00::5", dest_ip="fd00::7"), A, "demo/p", 0),
    c("ipBlocks-v4-mapped-peer", allow("p", from_(ipBlocks=["10.0.1.0/24"])),
      facts(source_ip="::ffff:10.0.1.5"), A, "demo/p", 0),
    c("ipBlocks-allow-plaintext", allow("p", from_(ipBlocks=["10.0.1.0/24"])),
      facts(principal=PLAIN), A, "demo/p", 0),
    c("notIpBlocks-listed", allow("p", from_(notIpBlocks=["10.0.1.0/24"])), facts(), D),
    c("notIpBlocks-other", allow("p", from_(notIpBlocks=["192.168.0.0/16"])),
      facts(), A, "demo/p", 0),
    # --- ports
    c("ports-match", allow("p", to(ports=["8080"])), facts(), A, "demo/p", 0),
    c("ports-miss", allow("p", to(ports=["9090"])), facts(), D),
    c("ports-any-of", allow("p", to(ports=["9090", "8080"])), facts(), A, "demo/p", 0),
    c("notPorts-listed", allow("p", to(notPorts=["8080"])), facts(), D),
    c("notPorts-other", allow("p", to(notPorts=["22"])), facts(), A, "demo/p", 0),
    # --- AND / OR inside a rule
    c("source-fields-and", allow("p", from_(principals=["*"], ipBlocks=["192.168.0.0/16"])),
      facts(), D),
    c("sources-or", allow("p", rule(frm=[src(namespaces=["prod"]), src(namespaces=["demo"])])),
      facts(), A, "demo/p", 0),
    c("from-and-to", allow("p", rule(frm=[src(namespaces=["demo"])], to=[op(ports=["9090"])])),
      facts(), D),
    c("operations-or", allow("p", rule(to=[op(ports=["1"]), op(ports=["8080"])])),
      facts(), A, "demo/p", 0),
    # --- when: the five L4 keys, values and notValues, ANDed
    c("when-source-ip", allow("p", when(cond("source.ip", ["10.0.1.0/24"]))),
      facts(), A, "demo/p", 0),
    c("when-source-ip-not", allow("p", when(cond("source.ip", not_values=["10.0.1.5"]))),
      facts(), D),
    c("when-source-namespace", allow("p", when(cond("source.namespace", ["demo"]))),
      facts(), A, "demo/p", 0),
    c("when-source-namespace-plaintext", allow("p", when(cond("source.namespace", ["*"]))),
      facts(principal=PLAIN), D),
    c("when-source-principal-prefix",
      allow("p", when(cond("source.principal", ["cluster.local/ns/demo/*"]))),
      facts(), A, "demo/p", 0),
    c("when-destination-ip", allow("p", when(cond("destination.ip", ["10.0.2.7"]))),
      facts(), A, "demo/p", 0),
    c("when-destination-ip-miss", allow("p", when(cond("destination.ip", ["10.0.2.8"]))),
      facts(), D),
    c("when-destination-port", allow("p", when(cond("destination.port", ["8080"]))),
      facts(), A, "demo/p", 0),
    c("when-destination-port-not", allow("p", when(cond("destination.port", not_values=["8080"]))),
      facts(), D),
    c("when-conditions-and", allow("p", when(cond("source.namespace", ["demo"]),
                                             cond("destination.port", ["9090"]))), facts(), D),
    c("when-values-and-notValues",
      allow("p", when(cond("source.ip", ["10.0.0.0/8"], ["10.0.1.0/24"]))), facts(), D),
    # --- rules: which one matched, empty rule, no rules
    c("second-rule-matches", allow("p", from_(namespaces=["prod"]), from_(namespaces=["demo"])),
      facts(), A, "demo/p", 1),
    c("empty-rule-allows-all", allow("p", rule()), facts(principal=PLAIN), A, "demo/p", 0),
    c("allow-empty-rules-denies-all", allow("p"), facts(), D, None, None, NO_MATCH),
    c("allow-no-rules-denies-all", policy("p", no_rules=True), facts(), D, None, None, NO_MATCH),
    c("deny-empty-rules-never-matches", deny("d"), facts(), A, None, None, NONE),
    c("deny-empty-rule-denies-all", deny("d", rule()), facts(), D, "demo/d", 0, DENIED),
    # --- scope: root namespace, namespace, selector
    c("root-applies-everywhere", allow("r", from_(namespaces=["prod"]), namespace=ROOT),
      facts(), D, None, None, NO_MATCH),
    c("root-selector-any-namespace",
      deny("r", rule(), namespace=ROOT, selector={"app": "backend"}), facts(), D, f"{ROOT}/r", 0),
    c("root-selector-no-match",
      deny("r", rule(), namespace=ROOT, selector={"app": "db"}), facts(), A, None, None, NONE),
    c("other-namespace-does-not-apply", deny("d", rule(), namespace="prod"), facts(), A,
      None, None, NONE),
    c("selector-matches", deny("d", rule(), selector={"app": "backend"}), facts(), D, "demo/d", 0),
    c("selector-no-match", deny("d", rule(), selector={"app": "db"}), facts(), A, None, None, NONE),
    c("selector-needs-every-label", deny("d", rule(), selector={"app": "backend", "version": "v2"}),
      facts(), A),
    c("selector-allow-applies-only-there",
      [allow("p", selector={"app": "db"}), allow("q", from_(namespaces=["demo"]))],
      facts(), A, "demo/q", 0),
    # --- order of evaluation
    c("deny-beats-allow", [allow("a", rule()), deny("d", from_(namespaces=["demo"]))],
      facts(), D, "demo/d", 0, DENIED),
    c("root-deny-beats-namespace-allow",
      [allow("a", rule()), deny("d", to(ports=["8080"]), namespace=ROOT)],
      facts(), D, f"{ROOT}/d", 0),
    c("deny-only-no-match-allows", deny("d", from_(namespaces=["legacy"])), facts(), A,
      None, None, NONE),
    c("some-allow-matches",
      [allow("a", from_(namespaces=["prod"])), allow("b", to(ports=["8080"]))],
      facts(), A, "demo/b", 0, OK_P),
    c("root-allow-reported-first", [allow("a", rule()), allow("r", rule(), namespace=ROOT)],
      facts(), A, f"{ROOT}/r", 0),
    c("no-policy-at-all", [], facts(), A, None, None, NONE),
    # --- AUDIT: named when it matches, never decides
    c("audit-alone", audit("au", rule()), facts(), A, None, None, NONE, ("demo/au",)),
    c("audit-with-deny", [audit("au", rule()), deny("d", rule())], facts(), D, "demo/d", 0,
      DENIED, ("demo/au",)),
    c("audit-no-match", audit("au", from_(namespaces=["prod"])), facts(), A, None, None, NONE),
    c("audit-with-allow-no-match", [audit("au", rule()), allow("a", to(ports=["1"]))], facts(),
      D, None, None, NO_MATCH, ("demo/au",)),
    # --- CUSTOM: reported by the loader, never enforced
    c("custom-not-enforced", custom("x", rule()), facts(), A, None, None, NONE),
    # --- L7 in ALLOW: the rule is dropped (fail closed)
    c("allow-l7-methods-dropped", allow("p", rule(to=[op(methods=["GET"])])), facts(), D,
      None, None, NO_MATCH),
    c("allow-l7-ports-and-methods-dropped", allow("p", rule(to=[op(ports=["8080"],
                                                                      methods=["GET"])])),
      facts(), D),
    c("allow-l7-other-rule-kept",
      allow("p", rule(to=[op(paths=["/a"])]), from_(namespaces=["demo"])),
      facts(), A, "demo/p", 1),
    c("allow-l7-requestPrincipals-dropped", allow("p", from_(requestPrincipals=["*"])),
      facts(), D),
    c("allow-l7-when-header-dropped",
      allow("p", rule(frm=[src(namespaces=["demo"])], when=[cond("request.headers[x]", ["1"])])),
      facts(), D),
    c("allow-l7-other-policy-allows", [allow("p", to(hosts=["a"])), allow("q", rule())],
      facts(), A, "demo/q", 0),
    # --- L7 in DENY: the HTTP parts go, the L4 parts still deny (broader)
    c("deny-l7-keeps-l4-part", deny("d", rule(frm=[src(namespaces=["legacy"])],
                                            to=[op(methods=["POST"])])),
      facts(principal=LEGACY, port=22), D, "demo/d", 0),
    c("deny-l7-l4-part-still-restricts", deny("d", rule(frm=[src(namespaces=["legacy"])],
                                                      to=[op(methods=["POST"])])),
      facts(), A, None, None, NONE),
    c("deny-l7-only-operation-matches-all", deny("d", rule(to=[op(methods=["POST"])])),
      facts(), D, "demo/d", 0),
    c("deny-l7-same-operation-ports", deny("d", rule(to=[op(ports=["8080"], methods=["POST"])])),
      facts(), D, "demo/d", 0),
    c("deny-l7-same-operation-other-port", deny("d", rule(to=[op(ports=["9090"],
                                                                 methods=["POST"])])),
      facts(), A, None, None, NONE),
    c("deny-l7-when-claim-removed",
      deny("d", rule(frm=[src(namespaces=["demo"])],
                     when=[cond("request.auth.claims[iss]", ["x"])])),
      facts(), D, "demo/d", 0),
    c("deny-l7-notRequestPrincipals-denies-all", deny("d", from_(notRequestPrincipals=["*"])),
      facts(), D, "demo/d", 0),
    c("deny-l7-remoteIpBlocks-with-ipBlocks",
      deny("d", from_(remoteIpBlocks=["1.2.3.4"], ipBlocks=["192.168.0.0/16"])), facts(), A),
    c("audit-l7-widened", audit("au", rule(to=[op(paths=["/admin*"])])), facts(), A,
      None, None, NONE, ("demo/au",)),
]


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_decision(case: Case) -> None:
    decision = decide(case.docs, case.conn)
    assert (("ALLOW" if decision.allowed else "DENY"), decision.policy, decision.rule) == (
        case.decision, case.policy, case.rule)
    if case.reason is not None:
        assert decision.reason == case.reason
    assert decision.audit == case.audit
