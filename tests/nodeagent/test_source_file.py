"""The YAML file source: initial snapshot, one per change, and the last good one kept."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import yaml

from nodeagent.objects import Snapshot, SourceError
from nodeagent.source import WorkloadSource
from nodeagent.source_file import FileSource

pytestmark = pytest.mark.unit

POLL = 0.02
QUIET = 0.3  # long enough for many polls: "nothing was yielded" means something


def pods(*names: str, ip_base: int = 1) -> str:
    return yaml.safe_dump_all([
        {"kind": "Pod", "metadata": {"name": n, "namespace": "demo"},
         "spec": {"nodeName": "node-1"}, "status": {"podIP": f"198.18.0.{ip_base + i}"}}
        for i, n in enumerate(names)])


def names(snapshot: Snapshot) -> list[str]:
    return [w.name for w in snapshot.state.workloads]


def replace_atomically(path: Path, text: str) -> None:
    """What most editors and config tools do: write a new file, rename it over."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Watcher:
    """Runs ``snapshots()`` in the background and queues what it yields."""

    def __init__(self, source: FileSource) -> None:
        self.queue: asyncio.Queue[Snapshot] = asyncio.Queue()
        self.source = source

    async def _pump(self) -> None:
        async for snapshot in self.source.snapshots():
            await self.queue.put(snapshot)

    async def next(self, timeout: float = 3.0) -> Snapshot:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def nothing(self) -> bool:
        await asyncio.sleep(QUIET)
        return self.queue.empty()


def run(path: Path, body: Callable[[Watcher], Awaitable[None]]) -> None:
    async def main() -> None:
        watcher = Watcher(FileSource(path, node="node-1", poll_interval=POLL))
        task = asyncio.get_running_loop().create_task(watcher._pump())
        try:
            await body(watcher)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    asyncio.run(main())


def test_it_is_a_workload_source(tmp_path: Path) -> None:
    source: WorkloadSource = FileSource(tmp_path / "x", node="node-1")
    assert source.node == "node-1"


def test_initial_snapshot_then_one_per_change(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    path.write_text(pods("a"))

    async def body(w: Watcher) -> None:
        first = await w.next()
        assert (names(first), first.state.version, first.source) == (["a"], 1, str(path))
        replace_atomically(path, pods("a", "b"))
        second = await w.next()
        assert (names(second), second.state.version) == (["a", "b"], 2)
        path.write_text(pods("c"))  # in place, as `>` or a simple editor does
        assert names(await w.next()) == ["c"]
    run(path, body)


def test_a_touch_without_new_content_yields_nothing(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    path.write_text(pods("a"))

    async def body(w: Watcher) -> None:
        await w.next()
        replace_atomically(path, pods("a"))
        os.utime(path)
        assert await w.nothing()
    run(path, body)


def test_a_broken_file_logs_once_and_keeps_the_last_good_snapshot(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pods.yaml"
    path.write_text(pods("a"))
    caplog.set_level(logging.INFO, logger="trellis.nodeagent.source")

    async def body(w: Watcher) -> None:
        await w.next()
        replace_atomically(path, "kind: Pod\nmetadata: [unclosed\n")
        assert await w.nothing()
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        fields = errors[0].fields  # type: ignore[attr-defined]
        assert fields["path"] == str(path) and fields["node"] == "node-1"
        assert f"{path}: line 3, column 1" in fields["error"]
        replace_atomically(path, pods("b"))
        assert names(await w.next()) == ["b"]
        assert any(r.getMessage() == "workload file usable again" for r in caplog.records)
    run(path, body)


def test_object_errors_are_logged_and_the_rest_is_yielded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pods.yaml"
    path.write_text(pods("a") + "---\nkind: Pod\nmetadata: {name: b}\nstatus: {podIP: 1.2.3}\n")
    caplog.set_level(logging.WARNING, logger="trellis.nodeagent.source")

    async def body(w: Watcher) -> None:
        snap = await w.next()
        assert names(snap) == ["a"]
        assert snap.errors == ("Pod default/b: status.podIP: '1.2.3' is not an IPv4 address",)
        (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.fields["error"] == snap.errors[0]  # type: ignore[attr-defined]
    run(path, body)


def test_a_file_deleted_and_recreated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pods.yaml"
    path.write_text(pods("a"))
    caplog.set_level(logging.WARNING, logger="trellis.nodeagent.source")

    async def body(w: Watcher) -> None:
        await w.next()
        path.unlink()
        assert await w.nothing()
        assert [r.getMessage() for r in caplog.records] == [
            "workload file missing; keeping the last good snapshot"]
        path.write_text(pods("b"))
        assert names(await w.next()) == ["b"]
    run(path, body)


def test_a_same_size_rewrite_within_one_clock_tick_is_seen(tmp_path: Path) -> None:
    """Size, inode and mtime all unchanged: only the bytes tell (the racy case)."""
    path = tmp_path / "pods.yaml"
    path.write_text(pods("a"))
    before = path.stat()

    async def body(w: Watcher) -> None:
        await w.next()
        with path.open("r+") as f:
            f.write(pods("b"))  # same length as pods("a")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert path.stat().st_size == before.st_size
        assert names(await w.next()) == ["b"]
    run(path, body)


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("a: [", "line 2, column 1"),
])
def test_a_bad_start_is_an_error(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "pods.yaml"
    if content is not None:
        path.write_text(content)

    async def first() -> Snapshot:
        stream: AsyncIterator[Snapshot] = FileSource(path, node="n").snapshots()
        return await stream.__anext__()
    with pytest.raises(SourceError, match=message):
        asyncio.run(first())


def test_poll_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        FileSource(tmp_path / "x", node="n", poll_interval=0)
