"""A workload source backed by one multi-document YAML file (the lab, VMs, laptops).

The file is polled, not watched with inotify: a poll of ``stat()`` every 0.2 s is
cheap, needs no watch on the parent directory, and sees every way an editor saves
(in-place write, write-then-rename, delete-then-create) as a change of
(device, inode, size, mtime).

Two races are handled:

- *Half-written files.* A change is loaded only once the file's signature has
  stayed the same for one poll interval, so a writer caught mid-save is not read.
- *Changes invisible to stat.* File timestamps come from a coarse clock, so a
  second same-size write within one tick looks unchanged (git's "racily clean"
  problem). While the loaded file's mtime is that recent, each poll also
  compares the bytes.

Bad input never reaches the agent: a file that no longer parses logs one error
and yields nothing, so the last good snapshot stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from identity.spiffe import DEFAULT_TRUST_DOMAIN
from nodeagent.objects import Snapshot, SourceError, parse_yaml, read_yaml_file

log = logging.getLogger("trellis.nodeagent.source")

# Longer than any filesystem's timestamp granularity we expect (ext4, xfs, tmpfs
# use the kernel's coarse clock, a few ms); FAT's 2 s is not a target.
_RACY_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class _Signature:
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> _Signature | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def racy(self) -> bool:
        return time.time_ns() - self.mtime_ns < _RACY_NS


class FileSource:
    """Snapshots of ``path``: the initial one, then one per change of its content."""

    def __init__(self, path: str | os.PathLike[str], *, node: str,
                 trust_domain: str = DEFAULT_TRUST_DOMAIN, poll_interval: float = 0.2) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval: {poll_interval!r} must be positive")
        self.path = Path(path)
        self.node = node
        self.trust_domain = trust_domain
        self.poll_interval = poll_interval
        self._version = 0

    def _fields(self, **more: object) -> dict[str, object]:
        return {"path": str(self.path), "node": self.node, **more}

    def _parse(self, data: bytes) -> Snapshot:
        return parse_yaml(data, source=str(self.path), trust_domain=self.trust_domain,
                          version=self._version + 1)

    def _accept(self, snapshot: Snapshot) -> Snapshot:
        self._version = snapshot.state.version
        for error in snapshot.errors:
            log.warning("object skipped", extra={"fields": self._fields(error=error)})
        log.info("workloads loaded", extra={"fields": self._fields(
            version=self._version, workloads=len(snapshot.state.workloads),
            services=len(snapshot.state.services), policies=len(snapshot.policies),
            errors=len(snapshot.errors))})
        return snapshot

    async def _read(self) -> bytes:
        return await asyncio.to_thread(read_yaml_file, self.path)

    async def _parse_off_loop(self, data: bytes) -> Snapshot:
        # The proxy shares this event loop: a large file must not stall every
        # connection for the length of a parse.
        return await asyncio.to_thread(self._parse, data)

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        loaded = _Signature.of(self.path)
        if loaded is None:
            raise SourceError(f"{self.path}: no such file (the workload file must exist at start)")
        # At start there is no good snapshot to fall back on, so a broken file is fatal.
        data = read = await self._read()
        yield self._accept(await self._parse_off_loop(data))

        pending: _Signature | None = None
        missing = broken = False
        while True:
            await asyncio.sleep(self.poll_interval)
            current = _Signature.of(self.path)
            if current is None:
                if not missing:
                    log.warning("workload file missing; keeping the last good snapshot",
                                extra={"fields": self._fields()})
                missing, pending = True, None
                continue
            missing = False
            if current == loaded and not current.racy():
                pending = None
                continue
            if current != loaded and current != pending:
                pending = current  # changed: wait one interval for the writer to finish
                continue
            pending, loaded = None, current
            try:
                new = await self._read()
                if new == read:  # the racy re-check found nothing new
                    continue
                read = new
                snapshot = await self._parse_off_loop(new)
            except SourceError as err:
                log.error("workload file unusable; keeping the last good snapshot",
                          extra={"fields": self._fields(error=str(err))})
                broken = True
                continue
            if broken:
                log.info("workload file usable again", extra={"fields": self._fields()})
                broken = False
            if new != data:
                data = new
                yield self._accept(snapshot)
