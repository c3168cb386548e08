"""Maps the spec's claims (PersistentVolumeClaims in a cluster) to local folders, and resolves paths.

In a pod every claim is mounted at /mnt/claims/<claim>; locally the user says `--volume CLAIM=DIR`.
A path may never leave its volume: not by '..', not by being absolute, not by a symlink pointing out
(checked on the real path, so a link inside the volume that stays inside is fine).
No torch here: the CLI front imports this for `validate`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from merge_worker.spec import AdapterMergeSpec, PathRef, SpecError

Expect = Literal["file", "dir", "output"]


class Volumes:
    def __init__(self, mapping: dict[str, Path]):
        self._roots = {claim: Path(folder) for claim, folder in mapping.items()}

    @classmethod
    def from_args(cls, values: list[str]) -> Volumes:
        """Parses `--volume CLAIM=DIR` options; each folder must exist."""
        mapping: dict[str, Path] = {}
        for value in values:
            claim, sep, folder = value.partition("=")
            if not sep or not claim or not folder:
                raise SpecError("--volume", f"expected CLAIM=DIR, got {value!r}")
            if claim in mapping:
                raise SpecError("--volume", f"claim {claim!r} is mapped twice")
            if not Path(folder).is_dir():
                raise SpecError("--volume", f"{claim}={folder}: {folder} is not a folder")
            mapping[claim] = Path(folder)
        return cls(mapping)

    @property
    def mapping(self) -> dict[str, Path]:
        return dict(self._roots)

    def root(self, claim: str, field: str) -> Path:
        if claim not in self._roots:
            raise SpecError(
                field, f"claim {claim!r} is not mapped to a folder (pass --volume {claim}=DIR)"
            )
        return self._roots[claim]

    def resolve(self, spec: AdapterMergeSpec, ref: PathRef, field: str, *, expect: Expect) -> Path:
        """The local path of `ref`. expect="file"/"dir": it must exist as that; expect="output": it may
        be missing, but what exists of it must stay inside the volume (a symlinked output is refused).
        Returns the path below the volume's real root, so later opens cannot be redirected outside."""
        claim = spec.claim_of(ref)
        root = self.root(claim, field).resolve()
        parts = ref.path.split("/")
        if ref.path.startswith("/") or ".." in parts:
            raise SpecError(field, f"{ref.path!r} must be a relative path inside volume {claim!r}")
        path = root.joinpath(*[p for p in parts if p not in ("", ".")])
        where = f"{ref.path!r} on volume {claim!r}"
        if expect == "output":
            return self._resolve_output(path, root, field, where)
        real = ensure_inside(path, root, field, where)
        if not path.exists():
            raise SpecError(field, f"{where} does not exist ({path})")
        if expect == "dir" and not real.is_dir():
            raise SpecError(field, f"{where} is not a folder ({path})")
        if expect == "file" and not real.is_file():
            raise SpecError(field, f"{where} is not a file ({path})")
        return real

    @staticmethod
    def _resolve_output(path: Path, root: Path, field: str, where: str) -> Path:
        if path == root:
            raise SpecError(field, f"{where} is the volume's root; name a folder inside it")
        if path.is_symlink():
            raise SpecError(field, f"{where} is a symlink; the output must be a real folder")
        # The parent folders may not exist yet: check the deepest one that does.
        existing = path.parent
        while not existing.exists():
            if existing.is_symlink():
                raise SpecError(field, f"{where}: {existing} is a dangling symlink")
            existing = existing.parent
        real_parent = Path(os.path.realpath(existing))
        if not real_parent.is_relative_to(root):
            raise SpecError(field, f"{where} leads outside its volume (symlink to {real_parent})")
        if path.exists() and not path.is_dir():
            raise SpecError(field, f"{where} exists and is not a folder; it is never replaced")
        return real_parent / path.relative_to(existing)


def ensure_inside(path: Path, root: Path, field: str, where: str | None = None) -> Path:
    """The real path of `path`, which may be or pass through a symlink but must not lead out of root."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise SpecError(field, f"{where or path} leads outside its volume (symlink to {real})")
    return real
