"""Typed reads of one Kubernetes-style document: every failure names the field path.

``objects.py`` turns whole documents into workloads and services; this module is
the small vocabulary it reads them with (``Fields.text("metadata.name")``,
``ipv4``, ``port_number``), so that every error in a user's YAML comes out the same
way: ``spec.ports[0].port: 'http' is not a port number``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, str] = MappingProxyType({})


class FieldError(Exception):
    """One field of one document is wrong; the text is ``path: problem``."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


class Fields:
    """Typed reads from one document; every failure names the field path."""

    def __init__(self, doc: Mapping[str, Any], prefix: str = "") -> None:
        self._doc = doc
        self._prefix = prefix

    def path(self, dotted: str) -> str:
        return f"{self._prefix}.{dotted}" if self._prefix else dotted

    def get(self, dotted: str) -> Any:
        node: Any = self._doc
        walked: list[str] = []
        for part in dotted.split("."):
            if node is None:
                return None
            if not isinstance(node, Mapping):
                raise FieldError(self.path(".".join(walked)),
                                 f"expected a mapping, got {kind_of(node)}")
            node = node.get(part)
            walked.append(part)
        return node

    def text(self, dotted: str, default: str | None = None) -> str:
        value = self.get(dotted)
        if value is None or value == "":
            if default is None:
                raise FieldError(self.path(dotted), "missing")
            return default
        if not isinstance(value, str):
            raise FieldError(self.path(dotted), f"{value!r} is not a string")
        return value

    def text_map(self, dotted: str) -> Mapping[str, str]:
        value = self.get(dotted)
        if value is None:
            return _EMPTY
        if not isinstance(value, Mapping):
            raise FieldError(self.path(dotted), f"expected a mapping, got {kind_of(value)}")
        for key, item in value.items():
            if not isinstance(key, str) or not isinstance(item, str):
                raise FieldError(f"{self.path(dotted)}[{key!r}]",
                           f"{item!r} is not a string (quote it in YAML)")
        return MappingProxyType(dict(value))

    def items(self, dotted: str) -> Iterator[Fields]:
        value = self.get(dotted)
        if value is None:
            return
        if not isinstance(value, list):
            raise FieldError(self.path(dotted), f"expected a list, got {kind_of(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, Mapping):
                raise FieldError(f"{self.path(dotted)}[{i}]",
                                 f"expected a mapping, got {kind_of(item)}")
            yield Fields(item, f"{self.path(dotted)}[{i}]")


def kind_of(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def ipv4(value: object, path: str) -> str:
    # Strings only: ipaddress would also take an int, and YAML makes ints easily.
    try:
        if isinstance(value, str):
            return str(ipaddress.IPv4Address(value))
    except ValueError:
        pass
    raise FieldError(path, f"{value!r} is not an IPv4 address")


def port_number(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise FieldError(path, f"{value!r} is not a port number")
    return value
