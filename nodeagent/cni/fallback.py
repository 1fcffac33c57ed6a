"""What the plugin does for a pod while no agent runs: the agent's last verdicts.

The plugin runs on the host for every new pod sandbox, and the agent is itself
a pod. While the agent is being replaced (upgrade, eviction, crash) nothing
answers on its socket. istio-cni's plugin asks the API server whether the pod
is ambient, lets a non-ambient pod through and fails an ambient one. Ours is a
small static binary with no API client, so the agent does the asking ahead of
time: on every snapshot it writes, next to its socket, one verdict per
namespace it knows (``<socket>.fallback``):

- ``wait``: the namespace is ambient, or some pod in it enrolled itself by its
  own label. A new pod there may be in the mesh, so without the agent ADD fails
  with CNI code 11 and the runtime retries until the agent is back; the pod
  never starts unredirected (fails closed);
- ``pass``: nothing in the namespace is in the mesh; the plugin lets the pod
  through, as istio-cni does for a pod that is not ambient.

A namespace not in the file, or no file at all (first install; /run is empty
after a reboot), means ``wait``: the plugin cannot tell, so it fails closed.
That wait ends when the agent is back, because the agent's own pod never waits:
its namespace is in ``excludeNamespaces``, checked before anything else.

What this cannot see: a namespace labelled ambient, or the first pod labelled
ambient in a namespace, *while the agent is away* keeps the old verdict, so such
a pod starts in plaintext and is enrolled (redirection, listeners) when the
agent returns, exactly as a running pod is when its namespace is labelled.
istio-cni has the same window when its plugin cannot reach the API server.

Pure render here; the agent's CNI server writes the file (atomically, by rename)
whenever the text changes. ``plugin/trellis_cni.c`` reads it, and so does a new
agent until its first snapshot: a namespace the last agent passed is not made to
wait for this one's sync either.
"""

from __future__ import annotations

import enum
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tunnel.state import AMBIENT, DATAPLANE_LABEL, MeshState

HEADER = "trellis-cni-fallback 1\n"
SUFFIX = ".fallback"
# A Kubernetes namespace name (RFC 1123 label). Anything else is left out, and so
# means "wait": the file's line format has no room for spaces or newlines.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class Fallback(enum.Enum):
    PASS = "pass"
    WAIT = "wait"


def fallback_path(agent_socket: Path) -> Path:
    return agent_socket.with_name(agent_socket.name + SUFFIX)


def verdicts(state: MeshState) -> dict[str, Fallback]:
    """Per namespace, what the plugin should do for a new pod there while no agent runs."""
    self_enrolled = {w.namespace for w in state.workloads if w.enrolled}
    out = {ns: Fallback.WAIT for ns in self_enrolled}
    for ns, labels in state.namespace_labels.items():
        ambient = labels.get(DATAPLANE_LABEL) == AMBIENT
        out[ns] = Fallback.WAIT if ambient or ns in self_enrolled else Fallback.PASS
    return out


def render(table: Mapping[str, Fallback]) -> str:
    lines = [f"{verdict.value} {ns}\n" for ns, verdict in sorted(table.items())
             if _NAMESPACE.fullmatch(ns)]
    return HEADER + "".join(lines)


def parse(text: str) -> dict[str, Fallback]:
    """The file as the plugin reads it: a bad header means no verdicts at all."""
    if not text.startswith(HEADER):
        return {}
    table: dict[str, Fallback] = {}
    for line in text[len(HEADER):].splitlines():
        verdict, _, ns = line.partition(" ")
        if verdict in ("pass", "wait") and _NAMESPACE.fullmatch(ns):
            table[ns] = Fallback(verdict)
    return table


def read(path: Path) -> dict[str, Fallback]:
    try:
        with path.open() as f:
            return parse(f.read(1 << 20))
    except (OSError, UnicodeDecodeError):
        return {}


def write(path: Path, text: str) -> None:
    """Whole or not at all: the plugin may read it at any moment."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
