"""The lock files (requirements/*.txt, made by scripts/lock.sh) are current with pyproject.toml: each
locks exactly the direct requirements of its extras, at versions inside pyproject's ranges, every file
hashed; the image locks ship the versions CI tests (dev.txt's)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# docs/install.md: which extras each lock file holds (the base dependencies are in all of them).
LOCKS = {
    "requirements/dev.txt": ("worker", "operator", "dev"),
    "requirements/worker.txt": ("worker",),
    "requirements/operator.txt": ("operator",),
}
# How uv names the project in a "# via" annotation when a requirement comes straight from pyproject.
FROM_PYPROJECT = "adaptermerge (pyproject.toml)"


@dataclass
class Pin:
    version: Version
    hashes: list[str] = field(default_factory=list)
    via: set[str] = field(default_factory=set)


def parse_lock(text: str) -> dict[str, Pin]:
    """uv's requirements output: `name==version [; marker] \\`, its `--hash=` lines, then `# via` lines."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in text.splitlines():
        requirement = re.match(r"([A-Za-z0-9][\w.\-]*)==([^\s;\\]+)", line)
        if requirement:
            name = canonicalize_name(requirement.group(1))
            assert name not in pins, f"{name} is locked twice"
            current = pins[name] = Pin(Version(requirement.group(2)))
        elif current is not None and (digest := re.search(r"--hash=(sha256:[0-9a-f]{64})", line)):
            current.hashes.append(digest.group(1))
        elif current is not None and line.startswith("    #"):
            if source := re.sub(r"^#\s*(via\b)?\s*", "", line.strip()):
                current.via.add(source)
        elif line.strip() and not line.startswith("#"):
            raise AssertionError(f"unexpected line in a lock file: {line!r}")
    return pins


def declared(extras: tuple[str, ...]) -> dict[str, Requirement]:
    """pyproject's requirements for the base plus these extras, by normalized name."""
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


LOCKED = {path: parse_lock((REPO / path).read_text()) for path in LOCKS}


def test_every_extra_has_a_lock():
    """A new extra in pyproject needs a place in a lock file (and in LOCKS)."""
    assert set(PYPROJECT["project"]["optional-dependencies"]) == set(LOCKS["requirements/dev.txt"])


@pytest.mark.parametrize("path", LOCKS)
def test_lock_holds_exactly_pyprojects_requirements_within_their_ranges(path: str):
    wanted = declared(LOCKS[path])
    pins = LOCKED[path]
    direct = {name for name, pin in pins.items() if FROM_PYPROJECT in pin.via}
    assert direct == set(wanted), (
        f"{path} is stale (run scripts/lock.sh): missing {sorted(set(wanted) - direct)}, "
        f"no longer in pyproject {sorted(direct - set(wanted))}")
    for name, requirement in wanted.items():
        assert requirement.specifier.contains(pins[name].version, prereleases=True), (
            f"{path}: {name}=={pins[name].version} is outside pyproject's {requirement} (run scripts/lock.sh)")


@pytest.mark.parametrize("path", LOCKS)
def test_every_locked_file_is_hashed(path: str):
    """pip install --require-hashes refuses a lock with one unhashed line."""
    unhashed = [name for name, pin in LOCKED[path].items() if not pin.hashes]
    assert not unhashed


@pytest.mark.parametrize("path", ["requirements/worker.txt", "requirements/operator.txt"])
def test_images_ship_the_versions_ci_tests(path: str):
    dev = LOCKED["requirements/dev.txt"]
    different = {name: (str(pin.version), str(dev[name].version)) for name, pin in LOCKED[path].items()
                 if name not in dev or dev[name].version != pin.version}
    assert not different, f"{path} differs from requirements/dev.txt (run scripts/lock.sh): {different}"


def test_operator_lock_has_no_torch():
    assert "torch" not in LOCKED["requirements/operator.txt"]
    assert "torch" in LOCKED["requirements/worker.txt"]


def test_parse_lock_reads_markers_hashes_and_multiline_via():
    """The parser itself, on the three shapes uv writes (so a format change cannot pass unnoticed)."""
    pins = parse_lock(
        "# header\n"
        "Foo_Bar==1.2.post1 ; sys_platform == 'linux' \\\n"
        f"    --hash=sha256:{'a' * 64}\n"
        "    # via\n"
        "    #   -c requirements/dev.txt\n"
        f"    #   {FROM_PYPROJECT}\n"
        f"baz==2 \\\n    --hash=sha256:{'b' * 64}\n"
        "    # via foo-bar\n")
    assert pins["foo-bar"].version == Version("1.2.post1")
    assert pins["foo-bar"].via == {"-c requirements/dev.txt", FROM_PYPROJECT}
    assert pins["baz"].via == {"foo-bar"} and pins["baz"].hashes == [f"sha256:{'b' * 64}"]
