"""`pip install .` without extras, in a clean venv, at the lock's versions: `adaptermerge --version`
works, torch is not there (the base install is the torch-free CLI front and the operator's deps), and
`adaptermerge validate` of the demo spec checks a folder without it (exit 0 valid, 2 invalid).
Needs PyPI (pip fetches the base dependencies and the build backend), as scripts/bootstrap.sh does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def lock_as_constraints(lock: Path) -> str:
    """pip refuses hashes in a constraints file: the lock's `name==version ; marker` lines only."""
    pins = re.findall(r"^([A-Za-z0-9][^\s\\]*==[^\s\\;]+(?: ; [^\\\n]+)?)", lock.read_text(), flags=re.M)
    assert len(pins) > 10, f"no pins read from {lock}"
    return "\n".join(p.strip() for p in pins) + "\n"


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean-install")
    venv = root / "venv"
    # The base interpreter, not this venv's: the new venv must not see the shared test venv.
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    constraints = root / "constraints.txt"
    constraints.write_text(lock_as_constraints(REPO / "requirements" / "dev.txt"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    # A copy of what the distribution is made of: setuptools builds in the source folder (build/).
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    for name in ("merge_worker", "operator"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(constraints), str(source)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


def run_in(venv: Path, *command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=venv.parent)


def test_version_works_without_extras(clean_venv: Path):
    done = run_in(clean_venv, str(clean_venv / "bin" / "adaptermerge"), "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"adaptermerge {VERSION}"


def test_no_torch_without_the_worker_extra(clean_venv: Path):
    done = run_in(clean_venv, str(clean_venv / "bin" / "python"), "-c", "import torch")
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr
    # numpy is a base dependency (validate scans tensors for non-finite values with it).
    done = run_in(clean_venv, str(clean_venv / "bin" / "python"), "-c", "import numpy, pydantic, yaml")
    assert done.returncode == 0, done.stderr


def test_installed_at_the_locked_versions(clean_venv: Path):
    locked = dict(re.findall(r"^([a-z0-9][a-z0-9.\-]*)==([^\s\\;]+)",
                             (REPO / "requirements" / "dev.txt").read_text(), flags=re.M))
    done = run_in(clean_venv, str(clean_venv / "bin" / "pip"), "list", "--format=freeze")
    installed = dict(line.lower().replace("_", "-").split("==") for line in done.stdout.split()
                     if "==" in line)
    for name in ("pydantic", "pyyaml", "numpy"):
        assert installed[name] == locked[name]


def test_license_ships_with_the_distribution(clean_venv: Path):
    licenses = list(clean_venv.glob("lib/python*/site-packages/adaptermerge-*.dist-info/licenses/LICENSE"))
    assert licenses, "LICENSE is not in the installed distribution"
    assert "Apache License" in licenses[0].read_text() and "Version 2.0, January 2004" in licenses[0].read_text()


# -- `validate` of the demo spec, without torch (docs/cli.md: exit 0 valid, 2 invalid input) ---------

DEMO_SPEC = REPO / "examples" / "demo" / "dev-assistant.yaml"


def validate_demo(venv: Path, store: Path) -> subprocess.CompletedProcess:
    return run_in(venv, str(venv / "bin" / "adaptermerge"), "validate", str(DEMO_SPEC), "--volume", f"store={store}")


def test_validate_refuses_an_empty_folder_with_the_path(clean_venv: Path, tmp_path: Path):
    done = validate_demo(clean_venv, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "spec." in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == [], "validate wrote into the volume"


def test_validate_passes_the_demo_store(clean_venv: Path, tmp_path: Path):
    """The demo's own store (scripts/prepare-smollm2.py and examples/demo/make-store.sh, run with the
    test venv's torch): the torch-free install checks every input of it and finds it valid."""
    model = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare-smollm2.py")],
                           capture_output=True, text=True)
    assert model.returncode == 0, model.stderr[-3000:]
    store = tmp_path / "store"
    made = subprocess.run([str(REPO / "examples" / "demo" / "make-store.sh"), str(store),
                           model.stdout.strip().splitlines()[-1]], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    done = validate_demo(clean_venv, store)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "valid: 3 adapters" in done.stdout
    assert not (store / "merged").exists()
