"""Fixtures for the packaging tests: the non-Python tools scripts/system-deps.sh installs."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@cache
def _system_deps_bin() -> Path:
    # Idempotent and instant once installed; on a fresh machine it installs lua5.4 and hadolint.
    done = subprocess.run([str(REPO / "scripts" / "system-deps.sh")], capture_output=True, text=True)
    assert done.returncode == 0, f"scripts/system-deps.sh failed:\n{done.stderr}"
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def system_tool():
    """system_tool("lua5.4") -> path of a tool from scripts/system-deps.sh (fails if it is missing)."""

    def find(name: str) -> str:
        path = shutil.which(name, path=str(_system_deps_bin())) or shutil.which(name)
        assert path, f"{name} is missing after scripts/system-deps.sh"
        return path

    return find
