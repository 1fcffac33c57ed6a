"""``trellis policy check``, through the real ``trellis`` entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from policy_support import FRONTEND, ROOT, allow, deny, op, rule, src

from trellis.cli import main

pytestmark = pytest.mark.unit

CONNECTION = ["--source-principal", FRONTEND, "--source-ip", "10.0.1.5",
              "--dest-namespace", "demo", "--dest-labels", "app=backend,version=v1",
              "--dest-ip", "10.0.2.7", "--dest-port", "8080"]

ALLOW_FRONTEND = allow("allow-frontend", rule(frm=[src(principals=["cluster.local/ns/demo/*"])],
                                              to=[op(ports=["8080"])]),
                       selector={"app": "backend"})
STRICT = deny("strict", rule(frm=[src(notPrincipals=["*"])]), namespace=ROOT)


def write(path: Path, *docs: object) -> Path:
    """A multi-document YAML file (each document in JSON form, which YAML reads)."""
    path.write_text("\n---\n".join(json.dumps(doc) for doc in docs))
    return path


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["policy", "check", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_text_output_names_decision_policy_and_rule(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    policies = write(tmp_path / "p.yaml", STRICT, ALLOW_FRONTEND)
    status, out, err = check(capsys, "-f", str(policies), *CONNECTION)
    assert (status, err) == (0, "")
    assert out.splitlines() == ["decision: ALLOW", "reason:   allowed_by_policy",
                                "policy:   demo/allow-frontend", "rule:     0"]


def test_json_output_is_exactly_the_documented_object(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policies = write(tmp_path / "p.yaml", STRICT, ALLOW_FRONTEND)
    plaintext = [a for a in CONNECTION if a not in ("--source-principal", FRONTEND)]
    status, out, _ = check(capsys, "-f", str(policies), *plaintext, "--json")
    assert status == 0
    assert json.loads(out) == {"decision": "DENY", "reason": "denied_by_policy",
                               "policy": f"{ROOT}/strict", "rule": 0, "audit": [],
                               "warnings": []}


def test_a_directory_reads_every_yaml_and_yml_file(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "a.yaml", ALLOW_FRONTEND, {"apiVersion": "v1", "kind": "Service",
                                                "metadata": {"name": "backend"}})
    write(tmp_path / "b.yml", deny("no-8080", rule(to=[op(ports=["8080"])])))
    (tmp_path / "notes.txt").write_text("not: [yaml")
    audit = allow("x", rule()) | {"spec": {"action": "AUDIT", "rules": [{}]}}
    write(tmp_path / "c.yaml", audit)
    status, out, _ = check(capsys, "-f", str(tmp_path), *CONNECTION, "--json")
    assert status == 0
    assert json.loads(out) == {"decision": "DENY", "reason": "denied_by_policy",
                               "policy": "demo/no-8080", "rule": 0, "audit": ["demo/x"],
                               "warnings": []}


def test_bad_documents_are_reported_and_the_rest_still_decide(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = allow("allow-frontend", rule(frm=[src(ipBlocks=["10.0.0.1", "10.0.0.300/8"])]))
    l7 = allow("allow-get", rule(to=[op(methods=["GET"])]))
    write(tmp_path / "bad.yaml", bad, l7)
    write(tmp_path / "good.yaml", deny("deny-legacy", rule(frm=[src(namespaces=["legacy"])])))
    status, out, err = check(capsys, "-f", str(tmp_path / "bad.yaml"),
                             "-f", str(tmp_path / "good.yaml"), *CONNECTION, "--json")
    error = ("demo/allow-frontend: rules[0].from[0].source.ipBlocks[1]: "
             "'10.0.0.300/8' is not a CIDR")
    fallback = ("demo/allow-frontend: invalid, so it fails closed: an ALLOW that matches "
                "nothing, for every workload in namespace demo (a node proxy that saw a valid "
                "version keeps enforcing that one instead)")
    warning = ("demo/allow-get: rules[0].to[0].operation.methods: not enforceable at L4 (HTTP "
               "attribute): rule 0 is dropped from this ALLOW policy (fails closed: more "
               "restrictive than written)")
    assert status == 0
    assert err == f"trellis: error: {error}\ntrellis: error: {fallback}\n"
    assert json.loads(out)["warnings"][:2] == [warning, (
        "demo/allow-get: rules: no rule is enforceable at L4, so this ALLOW policy matches "
        "nothing: its workloads are denied what no other ALLOW policy allows")]
    assert json.loads(out)["warnings"][-2:] == [f"error: {error}", f"error: {fallback}"]
    assert json.loads(out)["decision"] == "DENY"


def test_an_invalid_deny_gives_the_fail_closed_decision(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 6's case: one bad CIDR next to a good one must not let the source in."""
    bad = deny("deny-frontend", rule(frm=[src(ipBlocks=["10.0.1.5", "10.0.0.300/8"])]),
               selector={"app": "backend"})
    policies = str(write(tmp_path / "p.yaml", bad))
    status, out, err = check(capsys, "-f", policies, *CONNECTION)
    assert status == 0
    assert err.splitlines() == [
        "trellis: error: demo/deny-frontend: rules[0].from[0].source.ipBlocks[1]: "
        "'10.0.0.300/8' is not a CIDR",
        "trellis: error: demo/deny-frontend: invalid, so it fails closed: a DENY of every "
        "connection, for workloads with app=backend in namespace demo (a node proxy that saw "
        "a valid version keeps enforcing that one instead)"]
    assert out.splitlines() == ["decision: DENY", "reason:   invalid_policy",
                                "policy:   demo/deny-frontend", "rule:     -"]
    # Positive control: the workloads it does not select are still decided as before.
    other = [a.replace("app=backend", "app=web") for a in CONNECTION]
    assert check(capsys, "-f", policies, *other)[1].splitlines()[0] == "decision: ALLOW"


def test_text_output_lists_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    custom = allow("ext", rule()) | {"spec": {"action": "CUSTOM", "provider": {"name": "opa"},
                                              "rules": [{}]}}
    status, out, _ = check(capsys, "-f", str(write(tmp_path / "p.yaml", custom)), *CONNECTION)
    assert status == 0
    assert out.splitlines()[-1] == (
        "warning:  demo/ext: action: CUSTOM (external authorization) is not supported by "
        "Trellis; this policy is not enforced")


def test_root_namespace_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mesh_deny = deny("all", rule(), namespace="istio-system")
    policies = str(write(tmp_path / "p.yaml", mesh_deny))
    assert json.loads(check(capsys, "-f", policies, *CONNECTION, "--json")[1])["decision"] == (
        "ALLOW")
    _, out, _ = check(capsys, "-f", policies, *CONNECTION, "--json",
                      "--root-namespace", "istio-system")
    assert json.loads(out)["policy"] == "istio-system/all"


@pytest.mark.parametrize(("change", "message"), [
    ({"-f": None}, "-f FILE_OR_DIR is required"),
    ({"-f": "missing.yaml"}, "-f missing.yaml: no such file or directory"),
    ({"--dest-port": "80x"}, "--dest-port: '80x' is not a port (0-65535)"),
    ({"--dest-port": None}, "--dest-port is required"),
    ({"--source-ip": "10.0.0.300"}, "--source-ip: '10.0.0.300' is not an IP address"),
    ({"--dest-namespace": None}, "--dest-namespace is required"),
    ({"--dest-labels": "app"}, "--dest-labels: 'app' is not key=value"),
    ({"--source-principal": "cluster.local/ns/demo/sa/frontend"},
     "--source-principal: 'cluster.local/ns/demo/sa/frontend': a SPIFFE ID starts with "
     "'spiffe://'"),
    ({"--source-namespace": "prod"},
     "--source-namespace 'prod' disagrees with the principal's namespace 'demo'; policy takes "
     "the namespace from the peer identity"),
])
def test_user_errors_are_one_line_and_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str | None],
        message: str) -> None:
    options: dict[str, str | None] = dict(zip(CONNECTION[::2], CONNECTION[1::2], strict=True))
    options["-f"] = str(write(tmp_path / "p.yaml", ALLOW_FRONTEND))
    options.update(change)
    args = [part for key, value in options.items() if value is not None for part in (key, value)]
    status, out, err = check(capsys, *args)
    assert (status, out, err) == (2, "", f"trellis: error: {message}\n")


def test_an_empty_directory_is_a_user_error(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = check(capsys, "-f", str(tmp_path), *CONNECTION)
    assert (status, err) == (2, f"trellis: error: -f {tmp_path}: no *.yaml or *.yml files in "
                                f"this directory\n")


def test_source_namespace_without_a_principal_only_warns(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plaintext = [a for a in CONNECTION if a not in ("--source-principal", FRONTEND)]
    policies = str(write(tmp_path / "p.yaml", ALLOW_FRONTEND))
    status, out, _ = check(capsys, "-f", policies, *plaintext, "--source-namespace", "demo",
                           "--json")
    assert status == 0
    assert json.loads(out)["warnings"] == [
        "--source-namespace 'demo' does not count for a plaintext peer: policy takes the "
        "namespace from the peer identity"]
