"""The receive buffer every socket read of the data path lands in, one per thread.

Reads are consumed before the next read starts (the relay writes each chunk on
at once, or copies what it must keep), so one buffer serves every connection
of an event loop: no per-read allocation, and no 256 KiB per connection either.
A slice handed to a transport's ``write`` may stay queued there (uvloop keeps
the view rather than copying it); then the buffer is left to that view and a
new one takes its place.
"""

from __future__ import annotations

import threading

SIZE = 256 * 1024


class _PerThread(threading.local):
    buffer: bytearray | None = None


_current = _PerThread()  # one event loop per thread; the buffer is never shared across


def take() -> bytearray:
    """The thread's receive buffer, to fill and consume before the next `take`."""
    buffer = _current.buffer
    if buffer is None or _still_viewed(buffer):
        buffer = _current.buffer = bytearray(SIZE)
    return buffer


def _still_viewed(buffer: bytearray) -> bool:
    # A bytearray with live views cannot be resized, so a resize is the exact test.
    try:
        buffer.append(0)
    except BufferError:
        return True
    del buffer[-1]
    return False
