from __future__ import annotations

from pathlib import Path

import pytest
from evaluation.tiny_lm import write_tiny_store


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    return write_tiny_store(tmp_path_factory.mktemp("store"))
