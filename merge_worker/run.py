"""The merge worker's orchestrator: validate every input, merge module by module, write the output
atomically, evaluate it, and report.

Order matters: everything that can be checked (spec, paths, adapter files, shapes, NaN/Inf, the base
model, evaluation datasets, the output's existence) is checked before anything is written, so bad input
(exit 2) leaves no trace. The output is built in a temporary folder beside its target
(`.<name>.tmp-<random>`), which is removed on any failure and renamed into place only when complete
(evaluated, manifest written).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_worker.adapter_io import (
    Adapter,
    AdapterError,
    ModulePlan,
    check_same_base,
    iter_module_factors,
    plan_modules,
    read_adapter,
)
from merge_worker.adapter_writer import AdapterWriter
from merge_worker.base_weights import BaseWeights, BaseWeightsError
from merge_worker.eval_datasets import read_jsonl
from merge_worker.factors import LoraFactors, MergeParams
from merge_worker.manifest import FileDigests, build_manifest, describe_input, write_manifest
from merge_worker.merged_model_writer import weight_name, write_merged_model
from merge_worker.output import termination
from merge_worker.output.overlap import OUTPUT_FIELD, ProtectedPath, check_spares_inputs
from merge_worker.output.ownership import Owner, may_replace
from merge_worker.output.publish import OutputSlot, check_name_fits
from merge_worker.progress import ModuleProgress, ModuleRecord, evaluation_summary, log, merge_summary
from merge_worker.result import build_result
from merge_worker.spec import AdapterMergeSpec, SpecError
from merge_worker.volumes import Volumes, ensure_inside

Log = Callable[[str], None]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- validation: everything before anything is written ---------------------------------------------


@dataclass
class Inputs:
    spec: AdapterMergeSpec
    volumes: Volumes
    adapters: list[Adapter]
    adapter_paths: list[Path]
    plan: list[ModulePlan]
    saved: dict[str, tuple[bool, ...]]  # modules_to_save tensor name -> which adapters carry it
    base: BaseWeights | None
    base_path: Path | None
    dataset_paths: list[Path]
    output_path: Path
    protected: list[ProtectedPath]  # every input file and folder: the output never replaces or holds one
    owner: Owner | None


def load_inputs(spec: AdapterMergeSpec, volumes: Volumes, *, owner: Owner | None = None,
                spec_file: Path | None = None) -> Inputs:
    """Resolves and checks every input of `spec`; raises SpecError naming the field at fault.
    owner: the resource the output belongs to (--owner); spec_file: the YAML file, protected too."""
    adapter_paths = [
        volumes.resolve(spec, a, f"spec.adapters[{i}].path", expect="dir") for i, a in enumerate(spec.adapters)
    ]
    base_path = (
        volumes.resolve(spec, spec.base_model, "spec.baseModel.path", expect="dir") if spec.base_model else None
    )
    dataset_paths = [
        volumes.resolve(spec, d, f"spec.evaluation.datasets[{i}].path", expect="file")
        for i, d in enumerate(spec.evaluation.datasets if spec.evaluation else [])
    ]
    output_path = volumes.resolve(spec, spec.output, "spec.output.path", expect="output")
    roots = {claim: volumes.root(claim, "spec").resolve() for claim in spec.claims()}

    adapters = _read_adapters(spec, adapter_paths, roots)
    fields = {a.path: f"spec.adapters[{i}].path" for i, a in enumerate(adapters)}
    try:
        if not spec.allow_base_mismatch:
            check_same_base(adapters)
        plan = plan_modules(adapters)
        # One thread per adapter: the scan is reads and torch reductions, which release the GIL.
        with ThreadPoolExecutor(max_workers=min(len(adapters), os.cpu_count() or 1)) as pool:
            list(pool.map(Adapter.check_finite, adapters))  # raises the first failing adapter's error
    except AdapterError as exc:
        raise SpecError(fields[exc.path], str(exc)) from None
    saved = {
        name: tuple(name in a.saved for a in adapters)
        for name in sorted(set().union(*(a.saved for a in adapters)))
    }
    base = _open_base(spec, base_path, roots) if base_path else None
    _check_against_base(spec, adapters, plan, saved, base)
    for i, (ref, path) in enumerate(zip(spec.evaluation.datasets if spec.evaluation else [], dataset_paths)):
        read_jsonl(path, f"spec.evaluation.datasets[{i}].path", ref.max_examples)  # evaluation reads it again
    protected = _protected_paths(spec, adapters, base, dataset_paths, spec_file)
    _check_output(spec, output_path, protected, owner)
    return Inputs(spec, volumes, adapters, adapter_paths, plan, saved, base, base_path, dataset_paths,
                  output_path, protected, owner)


def _protected_paths(spec: AdapterMergeSpec, adapters: list[Adapter], base: BaseWeights | None,
                     dataset_paths: list[Path], spec_file: Path | None) -> list[ProtectedPath]:
    """Every input folder and every file read from it (a file may be a symlink to elsewhere)."""
    protected = []
    for i, adapter in enumerate(adapters):
        field_name = f"spec.adapters[{i}].path"
        protected += [ProtectedPath(p, field_name) for p in (adapter.path, *adapter.files())]
    if base is not None:
        protected += [ProtectedPath(p, "spec.baseModel.path") for p in (base.folder, *base.files())]
    protected += [ProtectedPath(p, f"spec.evaluation.datasets[{i}].path") for i, p in enumerate(dataset_paths)]
    if spec_file is not None:
        protected.append(ProtectedPath(spec_file, "the spec file"))
    return protected


def _read_adapters(spec: AdapterMergeSpec, paths: list[Path], roots: dict[str, Path]) -> list[Adapter]:
    adapters = []
    for i, (ref, path) in enumerate(zip(spec.adapters, paths)):
        field_name = f"spec.adapters[{i}].path"
        try:
            adapter = read_adapter(path)
        except AdapterError as exc:
            raise SpecError(field_name, str(exc)) from None
        _check_files_inside(adapter.files(), roots[spec.claim_of(ref)], field_name)
        adapters.append(adapter)
    return adapters


def _check_files_inside(files: list[Path], root: Path, field_name: str) -> None:
    """A file inside an input folder may be a symlink too: it must not lead out of the volume."""
    for path in files:
        ensure_inside(path, root, field_name)


def _open_base(spec: AdapterMergeSpec, path: Path, roots: dict[str, Path]) -> BaseWeights:
    try:
        base = BaseWeights(path)
    except BaseWeightsError as exc:
        raise SpecError("spec.baseModel.path", str(exc)) from None
    _check_files_inside(base.files(), roots[spec.claim_of(spec.base_model)], "spec.baseModel.path")
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
        first = carriers[0].saved_tensor(name)
        for i, adapter in enumerate(adapters):
            if name not in adapter.saved or not torch.equal(adapter.saved_tensor(name), first):
                raise SpecError(
                    f"spec.adapters[{i}].path",
                    f"{adapter.path}: modules_to_save tensor {name} differs between the adapters (or is "
                    "missing from this one); merging it needs spec.baseModel",
                )


def _check_output(spec: AdapterMergeSpec, output: Path, protected: list[ProtectedPath], owner: Owner | None) -> bool:
    """Whether the run may write `output` (raises if not); True when it would replace what is there."""
    check_name_fits(output, OUTPUT_FIELD)
    check_spares_inputs(output, protected)
    return may_replace(output, f"{spec.output.path!r} ({output})", overwrite=spec.output.overwrite, owner=owner,
                       field=OUTPUT_FIELD)


def pick_device(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device", "cuda was asked for but no CUDA device is available")
    if choice not in ("auto", "cuda"):
        raise SpecError("--device", f"expected auto, cpu or cuda, got {choice!r}")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- merging and writing ---------------------------------------------------------------------------


def merge_params(spec: AdapterMergeSpec) -> MergeParams:
    p = spec.parameters
    return MergeParams(method=spec.method, weights=tuple(spec.adapter_weights()), density=p.density,
                       lambda_=p.lambda_, t=p.t, seed=p.seed)


def _on_device(factors: list[LoraFactors | None], device: torch.device) -> list[torch.Tensor | None]:
    return [
        None if f is None else LoraFactors(f.a.to(device), f.b.to(device), f.scale).delta(torch.float32)
        for f in factors
    ]


def _saved_tensor_for(inputs: Inputs, name: str, params: MergeParams) -> torch.Tensor:
    """A merged modules_to_save tensor: the base plus the merge of the copies' deltas from the base,
    or (no base; checked identical) the copy itself."""
    from merge_worker.merge_engine import merge_dense

    carrier = next(a for a in inputs.adapters if name in a.saved)
    if inputs.base is None:
        return carrier.saved_tensor(name)
    base = inputs.base.get(name).to(torch.float32)
    taus = [a.saved_tensor(name).to(torch.float32) - base if name in a.saved else None for a in inputs.adapters]
    return base + merge_dense(taus, params, key=name).to("cpu", torch.float32)


def _write_adapter(inputs: Inputs, folder: Path, device: torch.device, progress: ModuleProgress,
                   params: MergeParams) -> list[ModuleRecord]:
    from merge_worker.merge_engine import merge_modules

    spec = inputs.spec
    first = inputs.adapters[0].config
    writer = AdapterWriter(
        folder,
        dtype=_DTYPES[spec.output.dtype or "float32"],
        inputs_config={"base_model_name_or_path": first.base_model_name_or_path,
                       "task_type": first.raw.get("task_type"), "fan_in_fan_out": first.fan_in_fan_out},
    )
    kinds = {m.name: m.kind for m in inputs.plan}
    records = []
    try:
        merged_modules = merge_modules(
            iter_module_factors(inputs.adapters, inputs.plan), params,
            rank=spec.output.rank, energy=spec.output.energy, device=device,
        )
        for name, merged in merged_modules:
            writer.add_module(name, kinds[name], merged)
            records.append(ModuleRecord(name, merged.rank, float(merged.relative_error), merged.note))
            progress.update(records[-1])
        for name in inputs.saved:
            writer.add_saved(name, _saved_tensor_for(inputs, name, params))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return records


def _write_merged_model(inputs: Inputs, folder: Path, device: torch.device, progress: ModuleProgress,
                        params: MergeParams) -> list[ModuleRecord]:
    from merge_worker.merge_engine import merge_dense

    plan = {m.name: m for m in inputs.plan}
    records = []

    def delta_for(name: str) -> torch.Tensor:
        # The exact dense merge: a merged model has no rank limit, so no factorisation error.
        factors = [a.factors(name) if p else None for a, p in zip(inputs.adapters, plan[name].present)]
        delta = merge_dense(_on_device(factors, device), params, key=name)
        records.append(ModuleRecord(name, None, 0.0, "exact dense delta"))
        progress.update(records[-1])
        return delta

    base = inputs.base
    dtype = _DTYPES[inputs.spec.output.dtype] if inputs.spec.output.dtype else base.dtype()
    write_merged_model(
        folder, base, {m.name: m.kind for m in inputs.plan}, delta_for,
        {name: (lambda n=name: _saved_tensor_for(inputs, n, params)) for name in inputs.saved},
        dtype=dtype, fan_in_fan_out=inputs.adapters[0].config.fan_in_fan_out,
    )
    return records


# -- publishing ------------------------------------------------------------------------------------


def _make_parents(folder: Path) -> list[Path]:
    """Creates missing parent folders; returns those it created (deepest last) to undo on failure."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


# -- the whole run ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    exit_code: int
    result: dict[str, Any]
    output: Path
    manifest: dict[str, Any]


def run_merge(spec: AdapterMergeSpec, volumes: Volumes, *, device: str = "auto", print_out: Log = print,
              tty: bool | None = None, owner: Owner | None = None, spec_file: Path | None = None) -> Outcome:
    """Runs a validated spec. Raises SpecError for bad input (nothing written); other exceptions are
    failures (nothing left behind either)."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    inputs = load_inputs(spec, volumes, owner=owner, spec_file=spec_file)
    torch_device = pick_device(device)
    timings["validate"] = time.monotonic() - started
    log(f"{len(inputs.adapters)} adapters, {len(inputs.plan)} modules, method {spec.method}, "
        f"output {spec.output.format} on {torch_device}")

    output = inputs.output_path
    created = _make_parents(output.parent)
    slot = OutputSlot(output, owner, inputs.protected, OUTPUT_FIELD)
    digests = FileDigests(_input_files(inputs))
    try:
        slot.open()
        records, evaluation, manifest = _build(inputs, slot.tmp, torch_device, timings, tty, digests)
        passed = evaluation is None or bool(evaluation.get("passed"))
        published = passed or spec.evaluation.publish_below_threshold
        if published:
            # Decided again: the output may have appeared (or changed hands) during the merge.
            slot.publish(_check_output(spec, output, inputs.protected, owner))
        else:
            raise _NotPublished
    except _NotPublished:
        _discard(slot, created)
    except BaseException:
        _discard(slot, created)
        raise
    else:
        slot.close()
    finally:
        digests.close()
    seconds = time.monotonic() - started
    print_out(merge_summary(records, seconds))
    if evaluation is not None:
        print_out(evaluation_summary(evaluation))
    exit_code = 0 if passed else 3
    message = f"merged {len(records)} modules with {spec.method}"
    message += f" into {spec.output.path}" if published else f"; {spec.output.path} was not published"
    if not passed:
        message += f"; evaluation below minRetention {spec.evaluation.min_retention}"
        if not published:
            message += " and spec.evaluation.publishBelowThreshold is false"
    if termination.noted_signal():
        message += f"; {termination.noted_signal()} arrived after the output was published, so the run finished"
    log(message)
    result = build_result(
        exit_code, message, seconds=seconds, modules=len(records),
        max_reconstruction_error=max((r.relative_error for r in records), default=0.0),
        rank=spec.output.rank if spec.output.format == "adapter" else None,  # a merged model has no rank
        output={"claimName": spec.claim_of(spec.output), "path": spec.output.path,
                "format": spec.output.format} if published else None,
        published=published,
        retention=None if evaluation is None else {
            name: d.get("retention") for name, d in evaluation.get("datasets", {}).items()
        },
    )
    return Outcome(exit_code, result, output, manifest)


class _NotPublished(Exception):
    """Evaluation fell below minRetention and the spec asks not to publish such an output."""


def _discard(slot: OutputSlot, created: list[Path]) -> None:
    slot.abort()
    for folder in reversed(created):
        _rmdir_if_empty(folder)


def _build(inputs: Inputs, tmp: Path, device: torch.device, timings: dict[str, float], tty: bool | None,
           digests: FileDigests):
    spec = inputs.spec
    params = merge_params(spec)
    start = time.monotonic()
    progress = ModuleProgress(len(inputs.plan), tty=tty)
    try:
        write = _write_adapter if spec.output.format == "adapter" else _write_merged_model
        records = write(inputs, tmp, device, progress, params)
    finally:
        progress.close()
    timings["merge"] = time.monotonic() - start
    evaluation = None
    if spec.evaluation is not None:
        from merge_worker.evaluation import evaluate_merge

        start = time.monotonic()
        evaluation = evaluate_merge(spec, inputs.volumes, tmp, device, log)
        timings["evaluate"] = time.monotonic() - start
    manifest = build_manifest(
        spec=spec.model_dump(mode="json", by_alias=True, exclude={"job"}),
        inputs=_describe_inputs(inputs, digests),
        device=str(device), modules=sorted(records, key=lambda r: r.name), timings=timings,
        evaluation=evaluation, owner=None if inputs.owner is None else inputs.owner.to_json(),
    )
    write_manifest(tmp, manifest)
    return records, evaluation, manifest


def _input_files(inputs: Inputs) -> list[Path]:
    """Every file the run reads, in the order the manifest lists them."""
    files = [f for adapter in inputs.adapters for f in adapter.files()]
    if inputs.base is not None:
        files += inputs.base.files()
    return files + list(inputs.dataset_paths)


def _describe_inputs(inputs: Inputs, digests: FileDigests) -> list[dict[str, Any]]:
    spec = inputs.spec
    described = []
    for ref, adapter in zip(spec.adapters, inputs.adapters):
        cfg = adapter.config
        described.append(describe_input(
            "adapter", spec.claim_of(ref), ref.path, adapter.path, adapter.files(), digests, name=ref.name,
            config={"r": cfg.r, "loraAlpha": cfg.lora_alpha, "useRslora": cfg.use_rslora,
                    "rankPattern": cfg.rank_pattern, "alphaPattern": cfg.alpha_pattern,
                    "baseModelNameOrPath": cfg.base_model_name_or_path},
        ))
    if inputs.base is not None:
        described.append(describe_input("baseModel", spec.claim_of(spec.base_model), spec.base_model.path,
                                        inputs.base_path, inputs.base.files(), digests))
    for ref, path in zip(spec.evaluation.datasets if spec.evaluation else [], inputs.dataset_paths):
        described.append(describe_input("evaluationDataset", spec.claim_of(ref), ref.path, path, [path],
                                        digests, name=ref.name))
    return described


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
