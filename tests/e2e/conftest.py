"""One lab for the whole e2e session: bringing it up costs seconds, not minutes."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e.labctl import status, trellis


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    os.environ["TRELLIS_LAB_DIR"] = str(tmp_path_factory.mktemp("lab"))
    trellis("lab", "down")
    try:
        trellis("lab", "up", timeout=180)
        yield status()
    finally:
        trellis("lab", "down")
        os.environ.pop("TRELLIS_LAB_DIR", None)
