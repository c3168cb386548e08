"""The Dockerfile (no image can be built here): its targets, pins, users and entrypoints, checked
against pyproject.toml and the real CLI; and hadolint's verdict."""

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


def ancestry(name: str) -> list[Stage]:
    """The stage and every stage it is built FROM or copies files from."""
    stage = STAGES[name]
    parents = [stage.base] + [m.group(1) for kw, a in stage.instructions if kw == "COPY"
                              for m in [re.search(r"--from=(\S+)", a)] if m]
    return [stage] + [s for p in parents if p in STAGES for s in ancestry(p)]


def pip_installed_extras(target: str) -> list[set[str]]:
    """For each `pip install` in the target's ancestry: the extras of the project it installs."""
    installs = []
    for stage in ancestry(target):
        for keyword, args in stage.instructions:
            for command in re.findall(r"pip install ([^&;]*)", args) if keyword == "RUN" else []:
                project = re.fullmatch(r"""["']?\.\[([\w,]+)\]["']?""", command.strip())
                assert project, f"{stage.name}: installs something besides the project: {command!r}"
                installs.append(set(project.group(1).split(",")))
    return installs


def requirement_names(extras: set[str]) -> set[str]:
    deps = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        deps += PYPROJECT["project"]["optional-dependencies"][extra]
    return {re.split(r"[=<>!~\[; ]", d, maxsplit=1)[0].lower() for d in deps}


def test_both_targets_exist():
    assert {"operator", "worker"} <= set(STAGES)


@pytest.mark.parametrize("target", ["operator", "worker"])
def test_base_images_are_pinned_versions(target: str):
    for stage in ancestry(target):
        if stage.base in STAGES:
            continue
        image, _, tag = stage.base.rpartition(":")
        assert image and re.search(r"\d+\.\d+", tag), f"{stage.name}: base {stage.base!r} has no version"


@pytest.mark.parametrize("target", ["operator", "worker"])
def test_target_runs_as_non_root(target: str):
    user = STAGES[target].last("USER")
    assert user is not None, f"{target} sets no USER"
    assert user.split(":")[0] not in ("root", "0")


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


def test_operator_image_installs_only_base_and_operator_dependencies():
    installs = pip_installed_extras("operator")
    assert installs == [{"operator"}]
    installed = requirement_names({"operator"})
    assert "torch" not in installed
    assert not installed & requirement_names({"worker"}) - requirement_names(set())


def test_worker_image_installs_the_gpu_stack():
    installs = pip_installed_extras("worker")
    assert installs == [{"worker"}]
    assert {"torch", "peft", "transformers", "bitsandbytes"} <= requirement_names({"worker"})
    assert STAGES["worker"].base.startswith("worker-base")
    assert "cuda" in STAGES["worker-base"].base


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
    for unwanted in ("tests", ".git", "examples/skills", "bench"):
        assert dockerignore_excludes(unwanted, patterns), f".dockerignore lets {unwanted} in"


def test_hadolint_passes(system_tool):
    done = subprocess.run([system_tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
