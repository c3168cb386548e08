"""Checks every input of a spec before anything is merged or written: the one validation that both
`adaptermerge validate` and `run` call, so they accept and refuse exactly the same inputs.

Torch-free: `validate` works with the base install (pydantic, PyYAML, numpy). Tensors are checked from
the safetensors headers and bytes (merge_worker.inputs.safetensors_file).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from merge_worker.inputs.adapters import (
    Adapter,
    AdapterError,
    ModulePlan,
    check_same_base,
    plan_modules,
    read_adapter,
    weight_name,
)
from merge_worker.inputs.base_weights import BaseWeights, BaseWeightsError
from merge_worker.evaluation.datasets import read_jsonl
from merge_worker.inputs.volume_files import FolderView, InputFolder, PathRefused
from merge_worker.output.overlap import ProtectedPath
from merge_worker.output.ownership import Owner
from merge_worker.output.target import check_target, protected_inputs
from merge_worker.spec import AdapterMergeSpec, SpecError
from merge_worker.inputs.volumes import Volumes

# Names the worker gives its siblings of the output (`.<name>.tmp-<random>`, `.<name>.old-<random>`)
# are the output's name plus at most this many bytes; the name must leave room for them.
TEMP_NAME_EXTRA_BYTES = 32


@dataclass
class Inputs:
    spec: AdapterMergeSpec
    volumes: Volumes
    adapters: list[Adapter]
    adapter_paths: list[Path]  # real paths (overlap checks); read through `adapters`
    plan: list[ModulePlan]
    saved: dict[str, tuple[bool, ...]]  # modules_to_save tensor name -> which adapters carry it
    base: BaseWeights | None
    base_path: Path | None
    dataset_paths: list[Path]  # paths that read the very files that were checked
    output_path: Path
    views: list[FolderView] = field(default_factory=list)  # keeps dataset_paths' folders alive
    protected: list[ProtectedPath] = field(default_factory=list)  # what the output may never replace
    owner: Owner | None = None  # the resource the output belongs to (--owner)


def load_inputs(spec: AdapterMergeSpec, volumes: Volumes, *, owner: Owner | None = None,
                spec_file: Path | None = None, writer_checks_base: bool = False) -> Inputs:
    """Resolves and checks every input of `spec`; raises SpecError naming the field at fault.
    owner: the resource the output belongs to (--owner); spec_file: the YAML file, which the output may
    not replace either. writer_checks_base: a merged-model output's writer checks each base tensor for
    NaN/Inf as it reads it (the same check and message), so `run` does not read the whole base twice;
    `validate` scans it here."""
    adapter_folders = [
        volumes.open_folder(spec, a, f"spec.adapters[{i}].path") for i, a in enumerate(spec.adapters)
    ]
    base_folder = volumes.open_folder(spec, spec.base_model, "spec.baseModel.path") if spec.base_model else None
    datasets = [
        volumes.open_file(spec, d, f"spec.evaluation.datasets[{i}].path")
        for i, d in enumerate(spec.evaluation.datasets if spec.evaluation else [])
    ]
    output_path = volumes.resolve(spec, spec.output, "spec.output.path", expect="output")

    adapters = []
    for i, folder in enumerate(adapter_folders):
        try:
            adapters.append(read_adapter(folder))
        except (AdapterError, PathRefused) as exc:
            raise SpecError(f"spec.adapters[{i}].path", str(exc)) from None
    fields = {a.path: f"spec.adapters[{i}].path" for i, a in enumerate(adapters)}
    try:
        if not spec.allow_base_mismatch:
            check_same_base(adapters)
        plan = plan_modules(adapters)
        # One thread per adapter: the scan is reads and numpy reductions, which release the GIL.
        with ThreadPoolExecutor(max_workers=min(len(adapters), os.cpu_count() or 1)) as pool:
            list(pool.map(Adapter.check_finite, adapters))  # raises the first failing adapter's error
    except AdapterError as exc:
        raise SpecError(fields[exc.path], str(exc)) from None
    saved = {
        name: tuple(name in a.saved for a in adapters)
        for name in sorted(set().union(*(a.saved for a in adapters)))
    }
    base = _open_base(spec, base_folder, saved, writer_checks_base) if base_folder else None
    _check_against_base(spec, adapters, plan, saved, base)
    for i, (ref, file) in enumerate(zip(spec.evaluation.datasets if spec.evaluation else [], datasets)):
        read_jsonl(file, f"spec.evaluation.datasets[{i}].path", ref.max_examples)  # evaluation reads it again
    protected = protected_inputs(
        [f.real for f in adapter_folders], [a.files() for a in adapters], base_folder.real if base_folder else None,
        base.files() if base else [], [f.path for f in datasets], spec_file)
    _check_output(spec, output_path, protected, owner)
    for ref, folder, adapter in zip(spec.adapters, adapter_folders, adapters):
        volumes.remember_view(spec, ref, adapter.view)
    if base is not None:
        volumes.remember_view(spec, spec.base_model, base.folder)
    views = [FolderView([file]) for file in datasets]
    return Inputs(spec, volumes, adapters, [f.real for f in adapter_folders], plan, saved, base,
                  base_folder.real if base_folder else None, [v / f.name for v, f in zip(views, datasets)],
                  output_path, views, protected, owner)


def _open_base(spec: AdapterMergeSpec, folder: InputFolder, saved: dict[str, tuple[bool, ...]],
               writer_checks_base: bool = False) -> BaseWeights:
    where = "spec.baseModel.path"
    try:
        base = BaseWeights(folder)
        if spec.evaluation is not None or spec.output.format == "merged-model":
            base.check_loadable()
        if spec.evaluation is not None:
            base.check_tokenizer()
        # The tensors the output is made of must be finite: all of them for a merged model.
        whole = spec.output.format == "merged-model" and not writer_checks_base
        used = None if whole else [n for n in saved if n in base]  # the merge reads modules_to_save itself
        bad = base.first_unusable(used)
    except BaseWeightsError as exc:
        raise SpecError(where, str(exc)) from None
    if bad is not None:
        raise SpecError(where, f"{base.path}: tensor {bad[0]} holds {bad[1]}")
    return base


def _check_against_base(
    spec: AdapterMergeSpec,
    adapters: list[Adapter],
    plan: list[ModulePlan],
    saved: dict[str, tuple[bool, ...]],
    base: BaseWeights | None,
) -> None:
    def field_of(present: tuple[bool, ...]) -> str:
        return f"spec.adapters[{present.index(True)}].path"

    fan_in_fan_out = adapters[0].config.fan_in_fan_out
    for module in plan if base else []:
        name = weight_name(module.name)
        out, inp = module.shape
        expected = (inp, out) if module.kind == "embedding" or fan_in_fan_out else (out, inp)
        if name not in base:
            raise SpecError(field_of(module.present), f"module {module.name}: the base model has no {name}")
        if base.shape(name) != expected:
            raise SpecError(
                field_of(module.present),
                f"module {module.name}: the adapter's delta fits a weight of shape {list(expected)}, "
                f"but the base model's {name} is {list(base.shape(name))}",
            )
    for name, present in saved.items():
        carriers = [a for a, p in zip(adapters, present) if p]
        if base is not None:
            if name not in base or base.shape(name) != carriers[0].saved_shape(name):
                raise SpecError(field_of(present), f"modules_to_save tensor {name} does not match the base model")
            continue
        first = carriers[0].saved_bytes(name)
        for i, adapter in enumerate(adapters):
            if name not in adapter.saved or adapter.saved_bytes(name) != first:
                raise SpecError(
                    f"spec.adapters[{i}].path",
                    f"{adapter.path}: modules_to_save tensor {name} differs between the adapters (or is "
                    "missing from this one); merging it needs spec.baseModel",
                )


def _check_output(spec: AdapterMergeSpec, output: Path, protected: list[ProtectedPath], owner: Owner | None) -> None:
    name_max = _name_max(output)
    if len(os.fsencode(output.name)) + TEMP_NAME_EXTRA_BYTES > name_max:
        raise SpecError("spec.output.path", f"the folder name {output.name[:40]!r}... is "
                        f"{len(os.fsencode(output.name))} bytes; at most {name_max - TEMP_NAME_EXTRA_BYTES} "
                        "leave room for the temporary name beside it")
    existing = output
    while not os.path.lexists(existing):
        existing = existing.parent
    if existing != output and not existing.is_dir():
        raise SpecError("spec.output.path", f"{spec.output.path!r} would be under {existing}, which is a file")
    check_target(spec, output, protected, owner)  # never an input; replaced only when allowed
    folder = existing if existing != output else output.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpecError("spec.output.path", f"the folder {folder} is not writable")


def _name_max(path: Path) -> int:
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_result_file(path: Path) -> None:
    """`--result-file` must be writable before anything runs: a run whose summary cannot be written
    would otherwise fail after its output is published. An existing file is opened for appending and
    closed (nothing written); a missing one needs a writable folder (nothing created)."""
    path = Path(path)
    if os.path.lexists(path):
        if path.is_dir():
            raise SpecError("--result-file", f"{path} is a folder")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            raise SpecError("--result-file", f"{path} cannot be written ({exc.strerror})") from None
        return
    parent = path.parent
    if not parent.is_dir():
        raise SpecError("--result-file", f"the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError("--result-file", f"the folder {parent} is not writable")
