"""``trellis-cni``: the executable the container runtime runs, a thin shell over spec.py.

ADD blocks until the node agent answers that redirection is installed in the
pod's namespace; if the agent cannot be reached or fails, ADD fails, so the
runtime tears the sandbox down and retries it later. The pod never runs a
single instruction with its traffic unredirected.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Mapping

from nodeagent.cni import spec
from nodeagent.cni.protocol import (
    FrameReader,
    PodRequest,
    PodResponse,
    ProtocolError,
    encode,
    parse_response,
)


def call_agent(path: str, request: PodRequest, timeout_s: float) -> PodResponse:
    """One request, one response over the agent's unix socket, within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    reader = FrameReader()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(encode(request))
            while (frame := reader.next_frame()) is None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = sock.recv(65536)
                if not data:
                    raise spec.CniError(spec.IO_FAILURE, "the node agent closed the connection "
                                        "without answering", path)
                reader.feed(data)
    except TimeoutError:
        raise spec.CniError(spec.TRY_AGAIN_LATER, f"the node agent did not answer within "
                            f"{timeout_s:g} s", path) from None
    except OSError as exc:
        raise spec.CniError(spec.TRY_AGAIN_LATER, "the trellis node agent is unreachable",
                            f"{path}: {exc.strerror or exc}") from None
    except ProtocolError as exc:
        raise spec.CniError(spec.IO_FAILURE, "bad answer from the node agent", str(exc)) from None
    try:
        return parse_response(frame)
    except ProtocolError as exc:
        raise spec.CniError(spec.IO_FAILURE, "bad answer from the node agent", str(exc)) from None


def _request(invocation: spec.Invocation) -> PodRequest:
    ip = spec.pod_ip(invocation) if invocation.command != "DEL" else ""
    return PodRequest(op=invocation.command.lower(), container_id=invocation.container_id,
                      netns=invocation.netns, pod_ip=ip,
                      pod_namespace=invocation.pod_namespace, pod_name=invocation.pod_name,
                      pod_uid=invocation.pod_uid)


def run(env: Mapping[str, str], stdin: bytes) -> spec.Output:
    version = "1.0.0"
    try:
        invocation = spec.parse_invocation(env, stdin)
        version = invocation.cni_version
        if invocation.command == "VERSION":
            return spec.version_output(version)
        request = _request(invocation)
        try:
            reply = call_agent(invocation.plugin.agent_socket, request,
                               invocation.plugin.timeout_s)
        except spec.CniError as exc:
            if invocation.command != "DEL":
                raise
            # DEL must not fail on what is already gone. With the agent down the
            # rules stay in the namespace, which the runtime is deleting anyway.
            print(f"trellis-cni: DEL {request.key}: {exc.msg} ({exc.details}); "
                  "nothing else to clean up", file=sys.stderr)
            return spec.success_output(invocation)
        if not reply.ok:
            code = spec.TRY_AGAIN_LATER if reply.retry else spec.IO_FAILURE
            raise spec.CniError(code, f"{invocation.command} {request.key}: {reply.error}",
                                invocation.container_id)
        return spec.success_output(invocation)
    except spec.CniError as exc:
        return spec.error_output(exc, version)


def main() -> int:
    output = run(os.environ, sys.stdin.buffer.read())
    if output.stdout:
        sys.stdout.write(output.stdout + "\n")
    return output.exit_code


if __name__ == "__main__":
    sys.exit(main())
