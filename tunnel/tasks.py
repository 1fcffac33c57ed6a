"""The one way Trellis starts a background task.

asyncio keeps only a weak reference to a task, so a task nobody holds can be
garbage-collected mid-flight, and an exception in a task nobody awaits is
reported late (at collection) without saying which task it was. `spawn` keeps a
strong reference until the task is done and logs a failure with the task's
name. Bare ``asyncio.create_task`` is banned elsewhere in the code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("trellis.tasks")

# Strong references to running tasks. Module-level on purpose: the set belongs
# to the running process, holds no configuration, and empties itself.
_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Run `coro` as a task named `name`; a failure is logged, never lost."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _running.add(task)
    task.add_done_callback(_finished)
    return task


def running_count() -> int:
    """How many spawned tasks are still running (for tests and debugging)."""
    return len(_running)


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("task %s failed: %r", task.get_name(), exc, exc_info=exc,
                  extra={"fields": {"task": task.get_name()}})
