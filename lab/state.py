"""The lab's state directory and its record, ``lab.json``.

Everything the lab writes outside the kernel lives under one directory
(``/run/trellis-lab``, or ``$TRELLIS_LAB_DIR``), so ``lab down`` can remove exactly
what the lab made and nothing else, even when the directory is shared::

    workloads.yaml  what the node agents read (rewritten atomically: they poll it)
    lab.json        the record: plan, documents, where they came from, mesh on/off
    ca/             the CA's state (root-cert.pem …)
    tokens/         per-node bearer tokens and digests.json for the CA
    logs/<p>.log    stdout and stderr of each process
    pids/<p>.pid    the pid of each process
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.plan import DEFAULT_PREFIX, LabPlan, plan_from_json, plan_to_json

ENV_DIR = "TRELLIS_LAB_DIR"
DEFAULT_DIR = "/run/trellis-lab"
# Namespace names are global to the machine; a different prefix lets a test lab
# run beside the user's lab (all addresses live inside the namespaces, so the two
# never meet). It must start with "tlab-" so it is recognisably the lab's; note that
# `lab down` of the default lab sweeps every tlab-* namespace, a test lab's too.
ENV_PREFIX = "TRELLIS_LAB_NETNS_PREFIX"
RECORD_FORMAT = 1


@dataclass(frozen=True)
class LabDir:
    root: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> LabDir:
        return cls(Path(environ.get(ENV_DIR) or DEFAULT_DIR))

    @property
    def workloads(self) -> Path:
        return self.root / "workloads.yaml"

    @property
    def record(self) -> Path:
        return self.root / "lab.json"

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def ca_root(self) -> Path:
        return self.root / "ca" / "root-cert.pem"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def digests(self) -> Path:
        return self.root / "tokens" / "digests.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def sockets(self) -> Path:
        return self.root / "sockets"

    def control_socket(self, node: str) -> Path:
        """Where node ``node``'s proxy listens for its agent."""
        return self.sockets / f"{node}.sock"

    def token(self, node: str) -> Path:
        return self.tokens / f"{node}.token"

    def log(self, process: str) -> Path:
        return self.logs / f"{process}.log"

    def pid(self, process: str) -> Path:
        return self.pids / f"{process}.pid"

    def entries(self) -> tuple[Path, ...]:
        """What the lab may have created here; `down` removes these and nothing else."""
        made = (self.workloads, self.record, self.ca, self.tokens, self.logs, self.pids,
                self.sockets)
        # Temporary files of a write_atomic() that was interrupted.
        temps = tuple(p for p in self.root.glob(".*") if p.name.startswith(
            (f".{self.workloads.name}.", f".{self.record.name}."))) if self.root.is_dir() else ()
        return made + temps


def netns_prefix(environ: Mapping[str, str] = os.environ) -> str:
    prefix = environ.get(ENV_PREFIX) or DEFAULT_PREFIX
    if not prefix.startswith(DEFAULT_PREFIX):
        raise LabError(f"{ENV_PREFIX}={prefix!r}: must start with {DEFAULT_PREFIX!r}")
    return prefix


@dataclass(frozen=True)
class LabRecord:
    plan: LabPlan
    documents: tuple[Mapping[str, Any], ...]  # the lab's objects now, after any apply/delete
    source: str  # where `lab up` read its description
    source_digest: str  # of what `lab up` read, to tell a repeat from a different lab
    mesh: bool


def digest_documents(documents: Sequence[Mapping[str, Any]]) -> str:
    canonical = json.dumps(list(documents), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_record(labdir: LabDir) -> LabRecord | None:
    try:
        data = json.loads(labdir.record.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"{labdir.record}: unreadable ({exc}); `trellis lab down` "
                       "removes the lab and its state") from None
    if data.get("format") != RECORD_FORMAT:
        raise LabError(f"{labdir.record}: written by another version of trellis; "
                       "`trellis lab down` removes it")
    return LabRecord(plan_from_json(data["plan"]), tuple(data["documents"]), data["source"],
                     data["source_digest"], data["mesh"])


def save_record(labdir: LabDir, record: LabRecord) -> None:
    data = {
        "format": RECORD_FORMAT,
        "source": record.source,
        "source_digest": record.source_digest,
        "mesh": record.mesh,
        "plan": plan_to_json(record.plan),
        "documents": list(record.documents),
    }
    write_atomic(labdir.record, json.dumps(data, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Readers (the agents poll workloads.yaml) see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


@contextlib.contextmanager
def locked(labdir: LabDir, create: bool = False) -> Iterator[None]:
    """One changing `trellis lab` command at a time (flock on the state directory).

    Only `up` creates the directory; for the others a missing directory means no
    lab, and nothing to guard.
    """
    if create:
        labdir.root.mkdir(parents=True, exist_ok=True)
    elif not labdir.root.is_dir():
        yield
        return
    fd = os.open(labdir.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise LabError(f"another `trellis lab` command is changing the lab "
                               f"({labdir.root} is locked); wait for it to finish") from None
            raise
        yield
    finally:
        os.close(fd)
