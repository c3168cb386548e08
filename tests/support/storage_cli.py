"""Running the real `adaptermerge` CLI on a spec whose URIs name the test servers (tests/support/
s3_server.py, oci_registry.py), and reading back what it pushed to the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

TITLE = "org.opencontainers.image.title"


def cli(tmp_path: Path, spec: dict, env: dict[str, str] | None = None, command: str = "run",
        extra: tuple[str, ...] = ()) -> tuple[int, str, dict | None]:
    """(exit code, stdout + stderr, the result file or None) of `adaptermerge COMMAND` on `spec`."""
    doc = {"apiVersion": "adaptermerge.io/v1alpha1", "kind": "AdapterMerge", "metadata": {"name": "storage"},
           "spec": spec}
    spec_file = tmp_path / "merge.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    result_file = tmp_path / "result.json"
    result_file.unlink(missing_ok=True)
    args = [sys.executable, "-m", "merge_worker.cli", command, str(spec_file), "--result-file", str(result_file)]
    if command == "run":
        args += ["--device", "cpu"]
    # No credentials of the machine running the tests leak in (AWS_*, a Docker config; HOME is the
    # test's folder, so no ~/.aws or ~/.docker either): each test gives its own in `env`.
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("AWS_") and k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG")}
    clean["HOME"] = str(tmp_path)
    done = subprocess.run([*args, *extra], capture_output=True, text=True, timeout=300, env=clean | (env or {}))
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    return done.returncode, done.stdout + done.stderr, result


def files_of(folder: Path) -> dict[str, bytes]:
    """The files of an adapter folder, by name: what an ORAS artifact of it holds."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def spec_of(a: str, b: str, output: dict, **extra) -> dict:
    """A linear merge of two adapter URIs over plain HTTP."""
    return {"registry": {"insecure": True},
            "adapters": [{"name": "a", "uri": a}, {"name": "b", "uri": b}],
            "method": "linear", "output": {"rank": 4, **output}, **extra}


def pulled(registry, repo: str, tag: str) -> tuple[dict, str, dict[str, bytes]]:
    """(manifest, its digest, {title: content}) of an artifact in the registry."""
    manifest, digest = registry.manifest(repo, tag)
    files = {layer["annotations"][TITLE]: registry.blob(repo, layer["digest"]) for layer in manifest["layers"]}
    return manifest, digest, files
