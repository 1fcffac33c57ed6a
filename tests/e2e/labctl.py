"""Driving the lab from tests: the same commands a user types."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

TRELLIS = [sys.executable, "-m", "trellis"]
LAB_DIR = "TRELLIS_LAB_DIR"
LAB_PREFIX = "TRELLIS_LAB_NETNS_PREFIX"
E2E_PREFIX = "tlab-e2e-"


def trellis(*args: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*TRELLIS, *args], capture_output=True, text=True,
                            timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"trellis {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def status() -> dict[str, Any]:
    return json.loads(trellis("lab", "status", "--json").stdout)


def pod(name: str) -> dict[str, Any]:
    return next(p for p in status()["pods"] if p["name"] == name)


def curl_json(src_pod: str, url: str, *extra: str) -> dict[str, Any]:
    out = trellis("lab", "exec", src_pod, "--", "curl", "-sS", "--max-time", "15", *extra,
                  url)
    return json.loads(out.stdout)


def in_netns(netns: str, *cmd: str, check: bool = True,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True,
                          check=check, timeout=timeout)


def node_netns(name: str) -> str:
    return str(next(n["netns"] for n in status()["nodes"] if n["name"] == name))


def node_metrics(node_netns: str) -> str:
    return in_netns(node_netns, "curl", "-sS", "--max-time", "5",
                    "http://127.0.0.1:15020/metrics").stdout


def eventually(check: Callable[[], bool], *, timeout: float, interval: float = 0.1) -> float:
    """Wait until ``check()`` holds; return how long it took (bounded by ``timeout``)."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def wait_until_listening(capture: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """tcpdump says "listening on ..." once its capture is live; wait for that line."""
    assert capture.stderr is not None
    # Read the raw descriptor: a buffered readline could swallow the line we
    # wait for into its buffer, and select() would then wait for nothing.
    fd = capture.stderr.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    while b"listening on" not in seen:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(remaining, 0))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            raise AssertionError(f"tcpdump did not start: {seen.decode()}")
        seen += chunk


def read_until(capture: subprocess.Popen[bytes], needle: bytes, timeout: float = 15) -> bytes:
    """Read a capture's stdout until ``needle`` appears; return all read so far.

    tcpdump prints packets in the order it saw them, so once a marker packet sent
    after the traffic under test is printed, every earlier packet is printed too:
    the capture can stop then, with no guess at how long printing takes."""
    assert capture.stdout is not None
    fd = capture.stdout.fileno()  # raw, as in wait_until_listening
    deadline = time.monotonic() + timeout
    seen = b""
    while needle not in seen:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(remaining, 0))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            raise AssertionError(f"the capture never showed {needle!r}; it saw: {seen.decode()}")
        seen += chunk
    return seen
