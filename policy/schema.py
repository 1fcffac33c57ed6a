"""Reading one document's fields with their paths, collecting every problem.

A `Reader` belongs to one document: it checks types and field names and
records errors and warnings as `Problem`s naming the policy and the field
path (``rules[0].from[0].source.ipBlocks[1]``), so that one bad document is
reported in full and the others still load.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping

from policy.model import Problem

# What one document may make the loader read, counting repeats: YAML aliases
# let a few KiB of text repeat a part millions of times, and the proxy loads
# policies on its event loop, at ~23 µs per entry (so ~0.25 s at this bound).
# Real policies have tens or hundreds of entries; one past this bound is an
# error, so it fails closed like any other invalid policy.
MAX_ENTRIES = 10_000


class TooLarge(Exception):
    """One document made the reader visit more than MAX_ENTRIES list and mapping entries."""


def child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def item(path: str, index: int) -> str:
    return f"{path}[{index}]"


def describe(value: object) -> str:
    """A value as an error message names it: ``integer 8080``, ``a list``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"{type(value).__name__.replace('int', 'integer')} {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


class Reader:
    """Typed access to one document, noting each problem against ``policy``."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self._entries = 0

    def _visit(self, entries: int) -> None:
        self._entries += entries
        if self._entries > MAX_ENTRIES:
            raise TooLarge

    def error(self, path: str, message: str) -> None:
        self.errors.append(Problem(self.policy, path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(Problem(self.policy, path, message))

    def mapping(self, value: object, path: str,
                fields: Collection[str] | None) -> Mapping[str, object] | None:
        """A mapping whose keys are all in ``fields`` (any keys if None).

        Null reads as an empty mapping: YAML's ``spec:`` with nothing under it.
        """
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.error(path, f"expected a mapping, got {describe(value)}")
            return None
        self._visit(len(value))
        for key in value:
            if not isinstance(key, str):
                self.error(path, f"field names are strings, got {describe(key)}")
            elif fields is not None and key not in fields:
                self.error(child(path, key), "unknown field" + _suggest(key, fields))
        return value

    def items(self, value: object, path: str) -> list[object] | None:
        """A list; null reads as absent (None)."""
        if value is None:
            return None
        if not isinstance(value, list):
            self.error(path, f"expected a list, got {describe(value)}")
            return None
        self._visit(len(value))
        return value

    def string(self, value: object, path: str) -> str | None:
        """A non-empty string; null reads as absent (None)."""
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(path, f"expected a string, got {describe(value)}")
            return None
        if not value:
            self.error(path, "must not be empty")
            return None
        return value

    def strings(self, value: object, path: str) -> tuple[str, ...]:
        """A list of non-empty strings; absent or null reads as ``()``.

        Istio says ``ports: ["8080"]``: a bare ``8080`` is an integer in YAML,
        which Kubernetes rejects for this schema, and so do we.
        """
        values = self.items(value, path)
        if values is None:
            return ()
        result: list[str] = []
        for index, entry in enumerate(values):
            if isinstance(entry, int | float) and not isinstance(entry, bool):
                self.error(item(path, index),
                           f'expected a string, got {describe(entry)} (quote it: "{entry}")')
                continue
            text = self.string(entry, item(path, index))
            if text is not None:
                result.append(text)
            elif entry is None:
                self.error(item(path, index), "expected a string, got null")
        return tuple(result)

    def string_map(self, value: object, path: str) -> dict[str, str]:
        """A mapping of strings to strings (labels); null reads as empty."""
        mapping = self.mapping(value, path, None)
        result: dict[str, str] = {}
        for key, entry in (mapping or {}).items():
            if not isinstance(key, str):
                continue  # already reported by mapping()
            if not isinstance(entry, str):
                self.error(child(path, key), f"expected a string, got {describe(entry)}")
            else:
                result[key] = entry
        return result


def _suggest(name: str, fields: Collection[str]) -> str:
    by_lower = {f.lower(): f for f in fields}
    close = difflib.get_close_matches(name.lower(), sorted(by_lower), n=1)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
