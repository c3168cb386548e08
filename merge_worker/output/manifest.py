"""merge-manifest.json, written beside the merged files: what went in (with sha256 of every input file),
how it was merged (method, parameters, library versions, device), and what came out (per-module rank and
reconstruction error, timings, evaluation). Enough to tell later exactly how an output was made.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from merge_worker.progress import ModuleRecord

MANIFEST_FILE = "merge-manifest.json"
_HASH_THREADS = 4
_LIBRARIES = ("adaptermerge", "torch", "safetensors", "peft", "transformers", "numpy", "pydantic")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    versions["torch"] = torch.__version__  # with its build tag (e.g. +cu130), unlike the dist version
    versions["cuda"] = torch.version.cuda
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FileDigests:
    """The sha256 of input files, computed in background threads while the merge runs: hashlib
    releases the GIL on large blocks, so hashing gigabytes of inputs adds little to the run's time.
    A file is hashed by one thread; several files (one per adapter) are hashed side by side."""

    def __init__(self, files: Iterable[Path]):
        self._pool = ThreadPoolExecutor(max_workers=min(_HASH_THREADS, os.cpu_count() or 1),
                                        thread_name_prefix="sha256")
        self._digests = {f: self._pool.submit(sha256_file, f) for f in dict.fromkeys(files)}

    def __getitem__(self, path: Path) -> str:
        return self._digests[path].result()

    def close(self) -> None:
        """Ends the thread; hashing that has not started is dropped (a failed run writes no manifest)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def describe_input(role: str, claim: str, path: str, folder: Path, files: list[Path], digests: FileDigests,
                   **extra: Any) -> dict:
    """One input: where it lives in the spec's terms, and the sha256 of each file read from it."""
    base = folder if folder.is_dir() else folder.parent
    return {
        "role": role,
        "claimName": claim,
        "path": path,
        **extra,
        "files": {str(f.relative_to(base)): digests[f] for f in files},
    }


def build_manifest(
    *,
    spec: dict[str, Any],
    inputs: list[dict[str, Any]],
    device: str,
    modules: list[ModuleRecord],
    timings: dict[str, float],
    evaluation: dict[str, Any] | None,
    owner: dict[str, str] | None = None,
) -> dict[str, Any]:
    """owner: the resource the output belongs to (--owner); a later generation of it may replace the
    output, another resource may not (merge_worker/output/ownership.py)."""
    errors = [m.relative_error for m in modules]
    return {
        "apiVersion": "adaptermerge.io/v1alpha1",
        "kind": "MergeManifest",
        "createdAt": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"owner": owner} if owner else {}),
        "method": spec["method"],
        "parameters": spec.get("parameters", {}),
        "output": spec["output"],
        "spec": spec,
        "inputs": inputs,
        "libraries": library_versions(),
        "device": device,
        "summary": {
            "modules": len(modules),
            "maxReconstructionError": max(errors, default=0.0),
            "meanReconstructionError": sum(errors) / len(errors) if errors else 0.0,
        },
        "modules": [_module_entry(m) for m in modules],
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "evaluation": evaluation,
    }


def _module_entry(record: ModuleRecord) -> dict[str, Any]:
    entry = {"name": record.name, "rank": record.rank, "relativeError": record.relative_error}
    return entry | ({"note": record.note} if record.note else {})


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False, default=str) + "\n")
    return path
