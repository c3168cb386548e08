"""The Dockerfile's rules, read from the file: base pinned by tag and digest (a build argument), one
base and one CUDA stack, dependencies from the lock files in a layer before the source, uid 10001, the
entrypoints against pyproject.toml and the real CLI; and hadolint's verdict. The images themselves are
built and run by tests/packaging/test_images.py (scripts/images/build.sh)."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What each image must be able to run: the operator its entrypoint, the worker the Job's command
# (docs/interfaces.md #7: `adaptermerge run ...`, which replaces the image's entrypoint).
RUNS = {"operator": ["adaptermerge", "operator"], "worker": ["adaptermerge", "run"]}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        found = [args for kw, args in self.instructions if kw == keyword]
        return found[-1] if found else None


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Stages by name; ARG defaults declared before the first FROM are substituted into FROM lines."""
    text = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            base, _, name = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest).partition(" AS ")
            current = stages[name.strip()] = Stage(name.strip(), base.strip())
        elif current is None and keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        elif current is not None:
            current.instructions.append((keyword, rest))
    return stages


STAGES = parse_dockerfile((REPO / "Dockerfile").read_text())


# Which lock file each image installs its dependencies from (docs/install.md).
LOCK_OF = {"operator": "requirements/operator.txt", "worker": "requirements/worker.txt"}
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def lineage(name: str) -> list[tuple[str, str]]:
    """The instructions whose layers end up in the image, oldest first: FROM parents only."""
    stage = STAGES[name]
    return (lineage(stage.base) if stage.base in STAGES else []) + stage.instructions


def external_base(name: str) -> str:
    stage = STAGES[name]
    return external_base(stage.base) if stage.base in STAGES else stage.base


def pip_installs(instructions: list[tuple[str, str]]) -> list[tuple[int, str]]:
    """(index of the RUN, arguments) for every `pip install`/`pip wheel` in these instructions."""
    return [(i, cmd.strip()) for i, (kw, args) in enumerate(instructions) if kw == "RUN"
            for cmd in re.findall(r"pip (?:install|wheel) ([^&;]*)", args)]


def copied_sources(args: str) -> list[str]:
    return [a for a in args.split()[:-1] if not a.startswith("--")]


def test_both_targets_exist():
    assert {"operator", "worker"} <= set(STAGES)


def test_base_image_is_pinned_by_tag_and_digest_and_swappable():
    dockerfile = (REPO / "Dockerfile").read_text()
    from_lines = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    external = [f for f in from_lines if f not in STAGES and f != "scratch"]
    assert external and all(re.fullmatch(r"\$\{\w+\}", f) for f in external), (
        f"every base image must come from a build argument: {external}")
    for target in ("operator", "worker"):
        base = external_base(target)
        name_tag, _, _ = base.partition("@")
        image, _, tag = name_tag.rpartition(":")
        assert image and re.search(r"\d+\.\d+", tag), f"{target}: base {base!r} has no versioned tag"
        assert DIGEST.search(base), f"{target}: base {base!r} has no sha256 digest"


def test_one_base_and_one_cuda_stack():
    """Both images share one base; the worker's CUDA comes from the torch wheels (nvidia-* packages in
    its lock), never from an nvidia/cuda base with a second, unused set of CUDA libraries."""
    assert external_base("operator") == external_base("worker")
    assert "cuda" not in external_base("worker").lower()
    worker_lock = (REPO / LOCK_OF["worker"]).read_text()
    assert re.search(r"^nvidia-cuda-runtime==13\.", worker_lock, flags=re.M)
    assert "torch==" in worker_lock


@pytest.mark.parametrize("target", ["operator", "worker"])
def test_target_runs_as_uid_10001(target: str):
    assert STAGES[target].last("USER") == "10001:10001"


@pytest.mark.parametrize("target", ["operator", "worker"])
def test_entrypoint_is_the_project_cli(target: str):
    entrypoint = json.loads(STAGES[target].last("ENTRYPOINT") or "null")
    assert isinstance(entrypoint, list), f"{target}: ENTRYPOINT must be in JSON (exec) form"
    assert entrypoint == RUNS[target][: len(entrypoint)]
    assert entrypoint[0] in PYPROJECT["project"]["scripts"]


@pytest.mark.parametrize("target", ["operator", "worker"])
def test_command_exists_in_the_package(target: str):
    """The console script's function, called as the image calls it with `--help`, accepts the
    subcommand. The operator image has no torch, so torch is made unimportable for it."""
    script, subcommand = RUNS[target]
    module, _, function = PYPROJECT["project"]["scripts"][script].partition(":")
    block_torch = "sys.modules['torch'] = None; " if target == "operator" else ""
    code = (f"import sys; {block_torch}from {module} import {function}; "
            f"sys.argv = ['{script}', '{subcommand}', '--help']; sys.exit({function}())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "invalid choice" not in done.stderr


@pytest.mark.parametrize("target", ["operator", "worker"])
def test_dependencies_install_from_the_lock_before_the_source(target: str):
    """The image's layers: its own lock installed hash-checked, then (a code change rebuilds only
    this) the project without dependencies. No layer before the dependencies holds the source."""
    steps = lineage(target)
    installs = pip_installs(steps)
    assert len(installs) == 2, f"{target}: expected a dependency install and a project install: {installs}"
    (deps_at, deps), (project_at, project) = installs
    lock_copy = [copied_sources(args) for kw, args in steps[:deps_at] if kw == "COPY"]
    assert [LOCK_OF[target]] in lock_copy, f"{target}: {LOCK_OF[target]} is not copied before {deps!r}"
    assert "--require-hashes" in deps.split() and re.search(r"-r \S+", deps), deps
    assert "--no-deps" in project.split() and ".whl" in project, project
    source_copies = [i for i, (kw, args) in enumerate(steps)
                     if kw == "COPY" and copied_sources(args) != [LOCK_OF[target]]]
    assert source_copies and min(source_copies) > deps_at, f"{target}: a COPY precedes the dependencies"
    assert deps_at < project_at


def test_only_the_project_wheel_stage_sees_the_source():
    """Every pip command outside the image layers builds the project only, without dependencies."""
    for stage in STAGES.values():
        if stage.name in LOCK_OF:
            continue
        for _, command in pip_installs(stage.instructions):
            assert "--no-deps" in command.split(), f"{stage.name}: {command!r} resolves dependencies"


@pytest.mark.parametrize("target", ["operator", "worker"])
def test_lock_matches_the_images_extras(target: str):
    """The operator's lock has no torch; the worker's has the GPU stack."""
    lock = (REPO / LOCK_OF[target]).read_text().lower()
    if target == "operator":
        assert "\ntorch==" not in lock and "\nkopf==" in lock
    else:
        for name in ("torch", "peft", "transformers", "bitsandbytes", "triton"):
            assert f"\n{name}==" in lock, name


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent folder counts."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_dockerfile_copies_and_drops_the_rest():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = {src for stage in STAGES.values() for kw, args in stage.instructions
              if kw == "COPY" and "--from=" not in args for src in args.split()[:-1]}
    assert copied
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: no such path"
        assert not dockerignore_excludes(src, patterns), f".dockerignore drops {src}"
    for unwanted in ("tests", ".git", "examples/skills", "bench", ".venv", "requirements/dev.txt"):
        assert dockerignore_excludes(unwanted, patterns), f".dockerignore lets {unwanted} in"


def test_hadolint_passes(system_tool):
    done = subprocess.run([system_tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
