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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_worker.inputs.adapters import iter_module_factors
from merge_worker.output.adapter_writer import AdapterWriter
from merge_worker.factors import LoraFactors, MergeParams
from merge_worker.inputs.validation import Inputs, load_inputs
from merge_worker.kernel_cache import seed_for
from merge_worker.output.manifest import FileDigests, build_manifest, describe_input, write_manifest
from merge_worker.output.merged_model_writer import write_merged_model
from merge_worker.output import termination
from merge_worker.output.overlap import OUTPUT_FIELD
from merge_worker.output.ownership import Owner
from merge_worker.output.publish import OutputSlot
from merge_worker.output.target import check_target
from merge_worker.progress import ModuleProgress, ModuleRecord, evaluation_summary, log, merge_summary
from merge_worker.output.result import build_result
from merge_worker.spec import AdapterMergeSpec, SpecError
from merge_worker.inputs.volumes import Volumes

Log = Callable[[str], None]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- validation: everything before anything is written (merge_worker.inputs.validation) ---------------


def pick_device(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device", "cuda was asked for but no CUDA device is available")
    if choice not in ("auto", "cuda"):
        raise SpecError("--device", f"expected auto, cpu or cuda, got {choice!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_for(device)  # the image's kernels compiled ahead of time for this GPU, before any can compile
    return device


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that cannot be read."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


# -- merging and writing ---------------------------------------------------------------------------


def merge_params(spec: AdapterMergeSpec) -> MergeParams:
    p = spec.parameters
    return MergeParams(method=spec.method, weights=tuple(spec.adapter_weights()), density=p.density,
                       lambda_=p.lambda_, t=p.t, seed=p.seed,
                       densities=tuple(a.density for a in spec.adapters),
                       gammas=tuple(a.gamma for a in spec.adapters),
                       epsilons=tuple(a.epsilon for a in spec.adapters),
                       gamma=p.gamma, epsilon=p.epsilon, normalize=p.normalize, rescale=p.rescale,
                       conventions=p.conventions, select_topk=1.0 if p.select_topk is None else p.select_topk)


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
        saved = ", ".join(sorted(inputs.saved))
        if spec.output.modules_to_save == "merge":
            for name in inputs.saved:
                writer.add_saved(name, _saved_tensor_for(inputs, name, params))
            if saved:
                log(f"kept modules_to_save {saved} in the adapter (vLLM refuses such adapters; "
                    "output.modulesToSave: drop leaves them out)")
        elif saved:
            log(f"left out modules_to_save {saved} (output.modulesToSave: drop)")
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
        dtype=dtype, fan_in_fan_out=inputs.adapters[0].config.fan_in_fan_out, pin_memory=device.type == "cuda",
        check_base=True,  # load_inputs(writer_checks_base=True) left the base's NaN/Inf scan to the writer
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
              tty: bool | None = None, owner: Owner | None = None, spec_file: Path | None = None,
              provenance: dict[str, Any] | None = None) -> Outcome:
    """Runs a validated spec. Raises SpecError for bad input (nothing written); other exceptions are
    failures (nothing left behind either). provenance: manifest keys that replace what the spec
    describes (the spec as written and the s3:// sources, merge_worker/storage/staging.py)."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    if (age := process_age()) is not None:
        timings["startup"] = age  # interpreter, imports (torch), spec: before this function ran
    inputs = load_inputs(spec, volumes, owner=owner, spec_file=spec_file,
                         writer_checks_base=spec.output.format == "merged-model")
    torch_device = pick_device(device)
    timings["validate"] = time.monotonic() - started
    if torch_device.type == "cuda":
        # The CUDA context, timed on its own rather than inside the first module's merge.
        start = time.monotonic()
        torch.zeros(1, device=torch_device).add_(1)
        torch.cuda.synchronize(torch_device)
        timings["cuda_init"] = time.monotonic() - start
    if device == "auto" and torch_device.type == "cpu":
        # A GPU node without a usable driver (or a GPU request met by a non-GPU node) must be visible.
        log("no CUDA device is available (torch.cuda.is_available() is False): merging on the CPU")
    log(f"{len(inputs.adapters)} adapters, {len(inputs.plan)} modules, method {spec.method}, "
        f"output {spec.output.format} on {torch_device}")

    output = inputs.output_path
    created = _make_parents(output.parent)
    slot = OutputSlot(output, owner, inputs.protected, OUTPUT_FIELD)
    digests = FileDigests(_input_files(inputs))
    try:
        slot.open()
        records, evaluation, manifest = _build(inputs, slot.tmp, torch_device, timings, tty, digests, provenance)
        passed = evaluation is None or bool(evaluation.get("passed"))
        published = passed or spec.evaluation.publish_below_threshold
        if published:
            # Decided again: the output may have appeared (or changed hands) during the merge.
            slot.publish(check_target(spec, output, inputs.protected, owner))
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
           digests: FileDigests, provenance: dict[str, Any] | None = None):
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
        from merge_worker.evaluation.scoring import evaluate_merge

        start = time.monotonic()
        evaluation = evaluate_merge(spec, inputs.volumes, tmp, device, log)
        timings["evaluate"] = time.monotonic() - start
    start = time.monotonic()
    described = _describe_inputs(inputs, digests)  # waits for the input files' sha256 still running
    timings["digests_wait"] = time.monotonic() - start
    manifest = build_manifest(
        spec=spec.model_dump(mode="json", by_alias=True, exclude={"job"}),
        inputs=described,
        device=str(device), modules=sorted(records, key=lambda r: r.name), timings=timings,
        evaluation=evaluation, owner=None if inputs.owner is None else inputs.owner.to_json(),
    )
    manifest.update(provenance or {})
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
            "adapter", spec.claim_of(ref), ref.path, adapter.view, adapter.files(), digests, name=ref.name,
            config={"r": cfg.r, "loraAlpha": cfg.lora_alpha, "useRslora": cfg.use_rslora,
                    "rankPattern": cfg.rank_pattern, "alphaPattern": cfg.alpha_pattern,
                    "baseModelNameOrPath": cfg.base_model_name_or_path},
        ))
    if inputs.base is not None:
        described.append(describe_input("baseModel", spec.claim_of(spec.base_model), spec.base_model.path,
                                        inputs.base.folder, inputs.base.files(), digests))
    for ref, path in zip(spec.evaluation.datasets if spec.evaluation else [], inputs.dataset_paths):
        described.append(describe_input("evaluationDataset", spec.claim_of(ref), ref.path, path, [path],
                                        digests, name=ref.name))
    return described


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
