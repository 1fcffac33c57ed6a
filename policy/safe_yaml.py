"""PyYAML's safe loader with one gap closed, for every reader of untrusted YAML.

PyYAML's constructors raise a plain ValueError, TypeError, AttributeError or
LookupError for a value that its resolver or an explicit tag hands them and that
does not fit (``2024-02-30``, ``!!int web``, ``!!int`` on nothing, ``!!bool
maybe``, ``!!timestamp x``; found by tests/fuzz/fuzz_k8s_objects.py). `SafeLoader`
raises them again as a ConstructorError at the node, so they name a line and
column like any YAML error and callers need to catch only ``yaml.YAMLError``.
It lives here, the lowest layer that reads YAML, so the policy loader and the
workload sources share it.
"""

from __future__ import annotations

from typing import Any

import yaml  # type: ignore[import-untyped]  # no types-PyYAML in the venv


class _ValueErrorsAtTheNode:
    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)  # type: ignore[misc]
        except (ValueError, TypeError, AttributeError, LookupError) as err:
            value = f"{node.value!r} " if isinstance(node, yaml.ScalarNode) else ""
            kind = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"{value}is not a valid !!{kind} ({err})", node.start_mark) from err


class SafeLoader(_ValueErrorsAtTheNode, yaml.SafeLoader):  # type: ignore[misc]
    """The pure-Python safe loader: its error texts are the policy loader's."""


_LIBYAML_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class FastSafeLoader(_ValueErrorsAtTheNode, _LIBYAML_SAFE_LOADER):  # type: ignore[misc,valid-type]
    """libyaml's safe loader where PyYAML has it: for large workload streams."""
