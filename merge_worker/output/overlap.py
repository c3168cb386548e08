"""The output may never be, contain, or lie inside an input (an adapter, the base model, an evaluation
dataset, the spec file), so that replacing it (`output.overwrite`, or a new generation of its owner) or
cleaning a crashed run's leftovers can never delete user data.

Compared by file identity (device and inode) of each path and its parent folders, after resolving
symlinks: this also catches the same folder reached through two claims mapped to overlapping folders,
a symlink (of a folder or of a single file) into the output, and bind mounts of one folder in two places.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from merge_worker.spec import SpecError

OUTPUT_FIELD = "spec.output.path"


@dataclass(frozen=True)
class ProtectedPath:
    """An input file or folder, and the spec field (or CLI argument) it came from."""

    path: Path
    field: str


def _identity(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _lineage(path: Path) -> dict[tuple[int, int], Path]:
    """The identity of the real path and of each of its parent folders, up to the root."""
    real = Path(os.path.realpath(path))
    lineage = {}
    for folder in (real, *real.parents):
        try:
            lineage[_identity(folder)] = folder
        except OSError:
            continue  # a parent we may not stat; the ones below still count
    return lineage


def _deepest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_spares_inputs(output: Path, protected: list[ProtectedPath], field: str = OUTPUT_FIELD) -> None:
    """Raises SpecError(field) if `output` (which may not exist yet) is, contains, or lies inside any
    protected path. Protected files lie inside no one; a missing protected path is skipped (the readers
    report it)."""
    existing = _deepest_existing(output)
    above = _lineage(existing)  # the output's nearest existing folder and everything above it
    own = _identity(output) if existing == output else None
    for item in protected:
        if not os.path.lexists(item.path):
            continue
        real = Path(os.path.realpath(item.path))  # also named so in messages: a loader's view path is not
        lineage = _lineage(real)
        if own is not None and own in lineage:
            how = "is" if lineage[own] == real else "contains"
            raise SpecError(field, f"{output} {how} the input {real} ({item.field}); it is never "
                                   "replaced or deleted, even with overwrite")
        if real.is_dir() and _identity(real) in above:
            raise SpecError(field, f"{output} lies inside the input {real} ({item.field}); an output "
                                   "never writes into an input")
