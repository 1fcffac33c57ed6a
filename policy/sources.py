"""YAML text → `Document`s, and the one-call `load_yaml` on top of the loader."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

import yaml  # type: ignore[import-untyped]  # no types-PyYAML in the venv

from policy.loader import (
    DEFAULT_NAMESPACE,
    DEFAULT_ROOT_NAMESPACE,
    Document,
    LoadResult,
    load_policies,
)
from policy.model import Problem
from policy.safe_yaml import SafeLoader

# A policy in JSON (`kubectl get -o json`, a List of them) nests about ten deep.
MAX_FLOW_DEPTH = 64
_BRACKETS = re.compile(r"[\[\]{}]")


def parse_yaml(text: str, source: str) -> tuple[tuple[Document, ...], tuple[Problem, ...]]:
    """Every document in a multi-document YAML stream, in order.

    A syntax error ends the stream (YAML cannot resynchronise); the documents
    before it are kept and the error names the line.
    """
    documents: list[Document] = []
    problems: list[Problem] = []
    deep = _too_deep(text)
    if deep is not None:
        return (), (Problem(source, "", f"invalid YAML: brackets nested more than "
                            f"{MAX_FLOW_DEPTH} deep at line {deep}"),)
    try:
        for number, body in enumerate(yaml.load_all(text, Loader=SafeLoader), start=1):
            documents.append(Document(body, f"{source} document {number}"))
    except yaml.YAMLError as exc:
        problems.append(Problem(source, "", f"invalid YAML: {_one_line(exc)}"))
    except RecursionError:
        # PyYAML composes nested collections recursively (found by
        # tests/fuzz/fuzz_policy_loader.py with 3,000 brackets).
        problems.append(Problem(source, "", "invalid YAML: nested too deeply"))
    return tuple(documents), tuple(problems)


def _too_deep(text: str) -> int | None:
    """The line where ``[``/``{`` nesting first passes MAX_FLOW_DEPTH, if it does.

    PyYAML's scanner is quadratic in flow nesting (3,000 brackets: ~2 s) before
    its composer runs out of stack, so deep nesting is refused before parsing.
    Brackets inside quoted strings count too: no real policy nests them 64 deep.
    """
    depth = 0
    for bracket in _BRACKETS.finditer(text):
        depth = depth + 1 if bracket.group() in "[{" else max(depth - 1, 0)
        if depth > MAX_FLOW_DEPTH:
            return text.count("\n", 0, bracket.start()) + 1
    return None


def load_yaml(sources: Iterable[tuple[str, str]] | str, *,
              root_namespace: str = DEFAULT_ROOT_NAMESPACE,
              default_namespace: str = DEFAULT_NAMESPACE) -> LoadResult:
    """Load policies from YAML: one text, or ``(source name, text)`` pairs."""
    pairs = [("<input>", sources)] if isinstance(sources, str) else list(sources)
    documents: list[Document] = []
    problems: list[Problem] = []
    for source, text in pairs:
        parsed, errors = parse_yaml(text, source)
        documents.extend(parsed)
        problems.extend(errors)
    result = load_policies(documents, root_namespace=root_namespace,
                           default_namespace=default_namespace)
    return replace(result, errors=(*problems, *result.errors))


def _one_line(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())
