"""Fuzz the CNI plugin's reading of what the runtime hands it (nodeagent/cni/spec.py).

Input: the environment as ``KEY=VALUE`` lines, an empty line, then stdin (the
network configuration). Everything the plugin does before it dials the agent
runs (the agent's CNI server does it now, on the call the plugin forwards): parse
the invocation, see whether it passes without the agent, find the pod's IP in
``prevResult`` (ADD, CHECK), and print the result or the spec's error object.
"""

from __future__ import annotations

import json

from nodeagent.cni import spec

ALLOWED: tuple[type[BaseException], ...] = (spec.CniError,)
MAX_LEN = 16 * 1024
DICTIONARY = (b"CNI_COMMAND=", b"ADD", b"DEL", b"CHECK", b"VERSION", b"CNI_NETNS=",
              b"CNI_ARGS=", b"K8S_POD_NAMESPACE=", b"\n\n", b'"cniVersion"', b'"1.0.0"',
              b'"0.4.0"', b'"prevResult"', b'"ips"', b'"interfaces"', b'"sandbox"',
              b'"address"', b'"interface"', b'"agentSocket"', b'"timeoutSeconds"',
              b'"excludeNamespaces"',
              b"true", b"false", b"null", b"[]", b"{}", b"-0", b"1e999", b'"\\ud800"')


def _split(data: bytes) -> tuple[dict[str, str], bytes]:
    head, _, stdin = data.partition(b"\n\n")
    env: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").split("\n"):
        key, _, value = line.partition("=")
        env[key] = value
    return env, stdin


def one_input(data: bytes) -> None:
    env, stdin = _split(data)
    try:
        invocation = spec.parse_invocation(env, stdin)
        spec.passes_without_agent(invocation)
        if invocation.command in ("ADD", "CHECK"):
            spec.pod_ip(invocation)
        output = spec.success_output(invocation)
    except spec.CniError as exc:
        output = spec.error_output(exc)
        assert output.exit_code != 0
    if output.stdout:
        json.loads(output.stdout)  # the runtime parses whatever we print
