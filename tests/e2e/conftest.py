"""One lab for the whole e2e session: bringing it up costs seconds, not minutes.

It runs under its own namespace prefix (``tlab-e2e-``) and state directory, so
a user's lab (``tlab-*``) on the same machine is neither used nor swept away.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e.labctl import E2E_PREFIX, LAB_DIR, LAB_PREFIX, status, trellis


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    saved = {k: os.environ.get(k) for k in (LAB_DIR, LAB_PREFIX)}
    os.environ[LAB_DIR] = str(tmp_path_factory.mktemp("lab"))
    os.environ[LAB_PREFIX] = E2E_PREFIX
    trellis("lab", "down")
    try:
        trellis("lab", "up", timeout=180)
        yield status()
    finally:
        trellis("lab", "down")
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
