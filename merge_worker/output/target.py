"""Whether a run may write its output path: never over or into an input, and never over what it may not
replace. Decided when the inputs are validated (`validate` and `run`) and again just before publishing,
since the output may have appeared (or changed hands) during the merge."""

from __future__ import annotations

from pathlib import Path

from merge_worker.output.overlap import OUTPUT_FIELD, ProtectedPath, check_spares_inputs
from merge_worker.output.ownership import Owner, may_replace
from merge_worker.spec import AdapterMergeSpec


def check_target(spec: AdapterMergeSpec, output: Path, protected: list[ProtectedPath], owner: Owner | None) -> bool:
    """Raises SpecError / OutputConflict when the run may not write `output`; returns whether it would
    replace an existing output."""
    check_spares_inputs(output, protected)
    return may_replace(output, f"{spec.output.path!r} ({output})", overwrite=spec.output.overwrite, owner=owner,
                       field=OUTPUT_FIELD)


def protected_inputs(adapter_folders: list[Path], adapter_files: list[list[Path]], base_folder: Path | None,
                     base_files: list[Path], dataset_files: list[Path], spec_file: Path | None) -> list[ProtectedPath]:
    """Every input folder and every file read from it (a file may be a symlink to elsewhere), each with
    the spec field it came from."""
    protected = []
    for i, (folder, files) in enumerate(zip(adapter_folders, adapter_files)):
        protected += [ProtectedPath(p, f"spec.adapters[{i}].path") for p in (folder, *files)]
    if base_folder is not None:
        protected += [ProtectedPath(p, "spec.baseModel.path") for p in (base_folder, *base_files)]
    protected += [ProtectedPath(p, f"spec.evaluation.datasets[{i}].path") for i, p in enumerate(dataset_files)]
    if spec_file is not None:
        protected.append(ProtectedPath(Path(spec_file), "the spec file"))
    return protected
