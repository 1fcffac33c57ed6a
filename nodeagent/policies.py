"""From the source's raw AuthorizationPolicy documents to the index the proxy enforces.

A bad policy is reported (by name and field path) and left out; the others
keep being enforced. Problems are logged when the set of them changes, not on
every snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from policy import Document, PolicyIndex, load_policies

_log = logging.getLogger("trellis.nodeagent.policy")


@dataclass
class PolicyLoader:
    root_namespace: str
    _reported: frozenset[str] = field(default_factory=frozenset)

    def load(self, documents: tuple[Mapping[str, object], ...], source: str) -> PolicyIndex:
        result = load_policies(
            [Document(body=doc, origin=f"{source} policy {i + 1}")
             for i, doc in enumerate(documents)],
            root_namespace=self.root_namespace)
        problems = {f"error: {p}" for p in result.errors} | {f"warning: {p}"
                                                             for p in result.warnings}
        for problem in sorted(problems - self._reported):
            level = logging.ERROR if problem.startswith("error") else logging.WARNING
            _log.log(level, problem.split(": ", 1)[1], extra={"fields": {"source": source}})
        self._reported = frozenset(problems)
        return PolicyIndex.build(result.policies)
