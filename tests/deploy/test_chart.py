"""The Helm chart: lint, render, schema-validate, and the plain manifests kept current.

helm comes from ``make setup`` (see HELM in the Makefile) and kubernetes-validate
from the test extras; a missing tool fails these tests rather than skipping them.
Rendered objects are validated against the Kubernetes 1.35 schemas shipped inside
kubernetes-validate (offline), in strict mode (unknown fields are errors).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.inprocess

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "charts" / "trellis"
K8S_VERSION = "1.35.0"
VALIDATE = Path(sys.executable).with_name("kubernetes-validate")


def _helm() -> str:
    if os.environ.get("TRELLIS_HELM"):
        return os.environ["TRELLIS_HELM"]
    found = re.search(r"^HELM := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile no longer defines HELM"
    path = ROOT / found.group(1)
    if not path.is_file():
        pytest.fail(f"{path} is missing: run 'make setup'")
    return str(path)


def _template(*flags: str) -> str:
    done = subprocess.run([_helm(), "template", "trellis", str(CHART), "--namespace",
                           "trellis-system", "--include-crds", *flags],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _validate(rendered: str, tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered)
    done = subprocess.run([str(VALIDATE), "--strict", "--quiet", "-k", K8S_VERSION, str(path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _docs(rendered: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all(rendered) if d}


def test_lint_strict() -> None:
    done = subprocess.run([_helm(), "lint", "--strict", str(CHART)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_default_render_validates(tmp_path: Path) -> None:
    rendered = _template()
    _validate(rendered, tmp_path)
    docs = _docs(rendered)
    agent = docs["DaemonSet", "trellis-agent"]["spec"]["template"]
    container = agent["spec"]["containers"][0]
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"],
                                        "add": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert agent["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert agent["metadata"]["annotations"]["prometheus.io/port"] == "15020"
    assert agent["spec"]["terminationGracePeriodSeconds"] == 30
    assert "--drain-seconds=25" in container["args"]  # the shutdown still fits in the grace
    assert "--cni-socket=/var/run/trellis/cni.sock" in container["args"]
    assert docs["Service", "trellis-ca"]["spec"]["ports"][0]["port"] == 15012
    assert ("CustomResourceDefinition", "authorizationpolicies.security.trellis.dev") in docs
    # Without PEMs in the values the root Secret is made out of band, not by the chart.
    assert not any(kind == "Secret" for kind, _ in docs)


def test_rbac_reads_only_and_the_ca_alone_reviews_tokens() -> None:
    docs = _docs(_template())
    agent = docs["ClusterRole", "trellis-agent"]["rules"]
    assert {v for rule in agent for v in rule["verbs"]} == {"get", "list", "watch"}
    groups = {g for rule in agent for g in rule["apiGroups"]}
    assert {"security.istio.io", "security.trellis.dev", "discovery.k8s.io"} <= groups
    ca = docs["ClusterRole", "trellis-ca"]["rules"]
    assert {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
            "verbs": ["create"]} in ca
    assert not any("secrets" in rule["resources"] for rule in agent + ca)


def test_non_default_values_render_and_validate(tmp_path: Path) -> None:
    rendered = _template(
        "--set", "trustDomain=example.org", "--set", "redirectMode=ebpf",
        "--set", "agent.resources.requests.cpu=250m",
        "--set", "agent.resources.limits.memory=1Gi", "--set", "ca.certLifetime=2h",
        "--set", "cni.enabled=false", "--set-string", "ca.root.cert=CERT",
        "--set-string", "ca.root.key=KEY")
    _validate(rendered, tmp_path)
    docs = _docs(rendered)
    container = docs["DaemonSet", "trellis-agent"]["spec"]["template"]["spec"]["containers"][0]
    assert "--trust-domain=example.org" in container["args"]
    assert "--redirect=ebpf" in container["args"]
    assert container["resources"]["requests"]["cpu"] == "250m"
    assert not any(a.startswith("--cni-socket") for a in container["args"])
    assert ("Secret", "trellis-ca-root") in docs
    assert ("ConfigMap", "trellis-ca-root-cert") in docs


@pytest.mark.parametrize("values", [
    ["--set", "redirectMode=nftables"],
    ["--set", "ca.certLifetime=1d"],
    ["--set", "agent.notASetting=1"],
])
def test_bad_values_are_refused_by_the_schema(values: list[str]) -> None:
    done = subprocess.run([_helm(), "template", "trellis", str(CHART), *values],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr


def test_plain_manifests_are_up_to_date() -> None:
    done = subprocess.run([str(ROOT / "deploy" / "render-manifests.sh"), _helm()],
                          capture_output=True, text=True, timeout=120, check=True)
    committed = (ROOT / "deploy" / "manifests" / "trellis.yaml").read_text()
    assert done.stdout == committed, "deploy/manifests/ is stale: run 'make manifests'"
