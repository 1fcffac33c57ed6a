#!/usr/bin/env python3
"""Smoke test of a running mesh: cross-node mTLS, a policy deny, the client's source IP.

The same checks run against the Vagrant cluster (``--driver kubectl``) and the
namespace lab (``--driver lab``), so the script that the VMs run is exercised by
``make test`` too (tests/vagrant/test_smoke_lab.py). Only the driver differs: how
to list pods, run a command in one, read a node agent's metrics, and apply or
delete a policy.

Checks, with a frontend pod on one node and a backend pod on another:

1. source IP: frontend → backend:8080 answers, and the backend app saw the
   frontend pod's own IP as its peer;
2. mTLS: the backend node's agent counts that connection with
   ``reporter="destination"``, ``connection_security_policy="mutual_tls"`` and the
   frontend's principal;
3. policy: a ``security.trellis.dev/v1`` DENY for the frontend's principal stops
   the request; deleting it lets requests through again.

Standard library only (it runs on a bare VM). Exit 0 when every check passes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

APP_PORT = 8080
DENY_POLICY = """\
apiVersion: security.trellis.dev/v1
kind: AuthorizationPolicy
metadata: {{name: smoke-deny-frontend, namespace: {namespace}}}
spec:
  selector: {{matchLabels: {{app: backend}}}}
  action: DENY
  rules:
  - from:
    - source: {{principals: ["{trust_domain}/ns/{namespace}/sa/frontend"]}}
"""
# Run inside the client pod: one GET, the body on stdout, exit 1 on any failure.
FETCH = ("import sys, urllib.request\n"
         "try:\n"
         "    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
         "except Exception as exc:\n"
         "    print(f'request failed: {exc!r}', file=sys.stderr)\n"
         "    sys.exit(1)\n")


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    node: str
    ip: str
    app: str


def _run(argv: Sequence[str], *, stdin: str | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _ok(argv: Sequence[str], **kw: object) -> str:
    done = _run(argv, **kw)  # type: ignore[arg-type]
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: {done.stderr.strip() or done.stdout}")
    return done.stdout


@contextlib.contextmanager
def _manifest_file(manifest: str) -> Iterator[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="smoke-") as out:
        out.write(manifest)
        out.flush()
        yield out.name


class LabDriver:
    """The namespace lab: ``trellis lab ...`` and ``ip netns exec``."""

    def __init__(self, trellis: Sequence[str]) -> None:
        self.trellis = list(trellis)

    def _status(self) -> dict:  # type: ignore[type-arg]
        return json.loads(_ok([*self.trellis, "lab", "status", "--json"]))

    def pods(self, namespace: str) -> list[Pod]:
        return [Pod(p["name"], p["namespace"], p["node"], p["ip"], p["labels"].get("app", ""))
                for p in self._status()["pods"] if p["namespace"] == namespace]

    def exec(self, pod: Pod, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return _run([*self.trellis, "lab", "exec", f"{pod.namespace}/{pod.name}", "--", *argv])

    def metrics(self, node: str) -> str:
        netns = next(n["netns"] for n in self._status()["nodes"] if n["name"] == node)
        return _ok(["ip", "netns", "exec", netns, "python3", "-c", FETCH,
                    "http://127.0.0.1:15020/metrics"])

    def apply(self, manifest: str) -> None:
        with _manifest_file(manifest) as path:
            _ok([*self.trellis, "lab", "apply", "-f", path])

    def delete(self, manifest: str) -> None:
        with _manifest_file(manifest) as path:
            _ok([*self.trellis, "lab", "delete", "-f", path])


class KubectlDriver:
    """A real cluster: ``kubectl``, metrics through the API server's pod proxy."""

    def __init__(self, kubectl: Sequence[str], system_namespace: str) -> None:
        self.kubectl = list(kubectl)
        self.system_namespace = system_namespace

    def _pods(self, namespace: str, selector: str = "") -> list[dict]:  # type: ignore[type-arg]
        argv = [*self.kubectl, "-n", namespace, "get", "pods", "-o", "json"]
        items = json.loads(_ok([*argv, "-l", selector] if selector else argv))["items"]
        return [p for p in items if p["status"].get("phase") == "Running"]

    def pods(self, namespace: str) -> list[Pod]:
        return [Pod(p["metadata"]["name"], namespace, p["spec"].get("nodeName", ""),
                    p["status"].get("podIP", ""), p["metadata"].get("labels", {}).get("app", ""))
                for p in self._pods(namespace)]

    def exec(self, pod: Pod, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return _run([*self.kubectl, "-n", pod.namespace, "exec", pod.name, "--", *argv])

    def metrics(self, node: str) -> str:
        # The Istio-named metrics are the node proxy's (DaemonSet trellis-proxy).
        proxies = [p for p in self._pods(self.system_namespace,
                                         "app.kubernetes.io/component=proxy")
                   if p["spec"].get("nodeName") == node]
        if not proxies:
            raise RuntimeError(f"no running trellis proxy on node {node}")
        name = proxies[0]["metadata"]["name"]
        return _ok([*self.kubectl, "get", "--raw",
                    f"/api/v1/namespaces/{self.system_namespace}/pods/{name}:15020/proxy/metrics"])

    def apply(self, manifest: str) -> None:
        _ok([*self.kubectl, "apply", "-f", "-"], stdin=manifest)

    def delete(self, manifest: str) -> None:
        _ok([*self.kubectl, "delete", "--ignore-not-found", "-f", "-"], stdin=manifest)


Driver = LabDriver | KubectlDriver


def eventually(check: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def pick_pair(pods: Sequence[Pod]) -> tuple[Pod, Pod]:
    """A frontend and a backend on different nodes (the point is crossing nodes)."""
    for client in (p for p in pods if p.app == "frontend" and p.ip):
        for server in (p for p in pods if p.app == "backend" and p.ip):
            if client.node and server.node and client.node != server.node:
                return client, server
    raise RuntimeError("no frontend and backend pods on different nodes")


def mtls_connections(metrics: str, principal_suffix: str) -> float:
    """Sum of destination-reported mTLS connections opened from that principal."""
    total = 0.0
    for line in metrics.splitlines():
        found = re.match(r"istio_tcp_connections_opened_total\{(.*)\}\s+(\S+)$", line)
        if not found:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if (labels.get("reporter") == "destination"
                and labels.get("connection_security_policy") == "mutual_tls"
                and labels.get("source_principal", "").endswith(principal_suffix)):
            total += float(found.group(2))
    return total


def smoke(driver: Driver, namespace: str, trust_domain: str,
          wait_s: float) -> tuple[int, list[str]]:
    """Run every check; return how many passed and the failures."""
    failures: list[str] = []
    passed: list[str] = []
    client, server = pick_pair(driver.pods(namespace))
    url = f"http://{server.ip}:{APP_PORT}/smoke"
    print(f"client {client.name} ({client.ip}, {client.node}) -> "
          f"server {server.name} ({server.ip}, {server.node})")
    answers: list[dict] = []  # type: ignore[type-arg]

    def request_ok() -> bool:
        done = driver.exec(client, ["python3", "-c", FETCH, url])
        if done.returncode == 0:
            answers.append(json.loads(done.stdout))
        return done.returncode == 0

    def report(name: str, ok: bool, detail: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        (passed if ok else failures).append(f"{name}: {detail}")

    principal = f"/ns/{namespace}/sa/frontend"
    before = mtls_connections(driver.metrics(server.node), principal)
    reached = eventually(request_ok, wait_s)
    peer = answers[-1]["peer"].rpartition(":")[0] if answers else ""
    report("cross-node request", reached, f"answered by {answers[-1]['pod']}" if answers
           else f"no answer from {url} within {wait_s:g} s")
    report("source IP preserved", peer == client.ip, f"app saw peer {peer or '-'}, "
           f"client is {client.ip}")
    counted = eventually(lambda: mtls_connections(driver.metrics(server.node), principal)
                         > before, 10)
    report("mutual TLS in metrics", counted,
           f'{server.node}: istio_tcp_connections_opened_total{{reporter="destination",'
           f'connection_security_policy="mutual_tls",source_principal=~".*{principal}"}} '
           f"{'increased' if counted else 'did not increase'}")

    policy = DENY_POLICY.format(namespace=namespace, trust_domain=trust_domain)
    driver.apply(policy)
    try:
        denied = eventually(lambda: not request_ok(), wait_s)
        report("policy deny", denied, "DENY for the frontend's principal "
               + ("refused the request" if denied else f"still let it through after {wait_s:g} s"))
    finally:
        driver.delete(policy)
    report("policy removed", eventually(request_ok, wait_s), "requests pass again")
    return len(passed), failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver", choices=("lab", "kubectl"), required=True)
    parser.add_argument("--namespace", default="demo")
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--system-namespace", default="trellis-system",
                        help="kubectl: where the proxy and agent DaemonSets run")
    parser.add_argument("--trellis", default="trellis",
                        help="lab: the trellis command (e.g. '.venv/bin/trellis')")
    parser.add_argument("--kubectl", default="kubectl", help="kubectl: the kubectl command")
    parser.add_argument("--wait", type=float, default=30.0,
                        help="seconds to wait for each change to take effect")
    args = parser.parse_args(argv)
    driver: Driver = (LabDriver(shlex.split(args.trellis)) if args.driver == "lab"
                      else KubectlDriver(shlex.split(args.kubectl), args.system_namespace))
    try:
        passed, failures = smoke(driver, args.namespace, args.trust_domain, args.wait)
    except (RuntimeError, subprocess.TimeoutExpired, StopIteration, KeyError) as exc:
        print(f"smoke: error: {exc}", file=sys.stderr)
        return 2
    print(f"{passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
