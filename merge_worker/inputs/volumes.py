"""Maps the spec's claims (PersistentVolumeClaims in a cluster) to local folders, and resolves paths.

In a pod every claim is mounted at /mnt/claims/<claim>; locally the user says `--volume CLAIM=DIR`.
A path may never leave its volume: not by '..', not by being absolute, not by a symlink pointing out
(a link inside the volume that stays inside is fine). Inputs are opened with
merge_worker.inputs.volume_files, which follows each path beneath the volume's root before anything is
opened. No torch here: the CLI front imports this for `validate`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from merge_worker.inputs.volume_files import InputFile, InputFolder, PathRefused, VolumeRoot
from merge_worker.spec import AdapterMergeSpec, PathRef, SpecError

Expect = Literal["file", "dir", "output"]


class Volumes:
    def __init__(self, mapping: dict[str, Path]):
        self._roots = {claim: Path(folder) for claim, folder in mapping.items()}
        self._opened: dict[str, VolumeRoot] = {}
        self._views: dict[tuple[str, str], Path] = {}
        self._kept: list[object] = []  # views made here live as long as this object

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

    def open_folder(self, spec: AdapterMergeSpec, ref: PathRef, field: str) -> InputFolder:
        """The input folder `ref` names, opened beneath its volume; SpecError naming `field` otherwise."""
        return self._open(spec, ref, field, folder=True)

    def open_file(self, spec: AdapterMergeSpec, ref: PathRef, field: str) -> InputFile:
        """The input file `ref` names, opened beneath its volume; SpecError naming `field` otherwise."""
        return self._open(spec, ref, field, folder=False)

    def _open(self, spec: AdapterMergeSpec, ref: PathRef, field: str, *, folder: bool):
        volume, path, where = self._locate(spec, ref, field)
        try:
            return (volume.open_folder if folder else volume.open_file)(ref.path, path)
        except PathRefused as exc:
            raise SpecError(field, f"{where} {exc} ({path})") from None

    def remember_view(self, spec: AdapterMergeSpec, ref: PathRef, view: Path) -> None:
        """Records the view (merge_worker.inputs.volume_files) of the files validated for `ref`."""
        self._views[(spec.claim_of(ref), ref.path)] = view

    def view_of(self, spec: AdapterMergeSpec, ref: PathRef, field: str) -> Path:
        """A folder path for loaders (transformers, peft) that reads exactly the checked files of the
        input folder `ref`: the one validation recorded, else a view of all its files."""
        key = (spec.claim_of(ref), ref.path)
        if key not in self._views:
            folder = self.open_folder(spec, ref, field)
            try:
                view = folder.view()
            except PathRefused as exc:
                raise SpecError(field, f"{folder.path}: {exc}") from None
            self._kept.append(view)
            self._views[key] = view.path
        return self._views[key]

    def _locate(self, spec: AdapterMergeSpec, ref: PathRef, field: str) -> tuple[VolumeRoot, Path, str]:
        claim = spec.claim_of(ref)
        root = self.root(claim, field)
        if ref.path.startswith("/") or ".." in ref.path.split("/"):
            raise SpecError(field, f"{ref.path!r} must be a relative path inside volume {claim!r}")
        if claim not in self._opened:
            self._opened[claim] = VolumeRoot(root)
        path = root.joinpath(*[p for p in ref.path.split("/") if p not in ("", ".")])
        return self._opened[claim], path, f"{ref.path!r} on volume {claim!r}"

    def resolve(self, spec: AdapterMergeSpec, ref: PathRef, field: str, *, expect: Expect) -> Path:
        """The real local path of `ref`. expect="file"/"dir": it must exist as that, beneath its volume;
        expect="output": it may be missing, but what exists of it must stay inside the volume (a
        symlinked output is refused). Inputs are read through open_folder/open_file, not this path."""
        if expect == "dir":
            return self.open_folder(spec, ref, field).real
        if expect == "file":
            return _real(self.open_file(spec, ref, field))
        claim = spec.claim_of(ref)
        self._locate(spec, ref, field)
        root = self.root(claim, field).resolve()
        path = root.joinpath(*[p for p in ref.path.split("/") if p not in ("", ".")])
        return self._resolve_output(path, root, field, f"{ref.path!r} on volume {claim!r}")

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


def _real(file: InputFile) -> Path:
    return Path(os.readlink(file.proc_path))
