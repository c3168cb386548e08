"""Runs a search (docs/search.md): the base model loaded once with the source adapters attached; each
candidate merged by the merge engine into a scratch adapter, attached, scored on the search split of
every evaluation dataset and detached; then the best candidate goes through the plain merge path
(merge_worker.run.run_merge), which writes, evaluates on the report split and publishes it."""

from __future__ import annotations

import dataclasses
import io
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_worker.evaluation.scoring import (
    Task, encode, load_scorer, read_datasets, release_memory, retention, source_adapter_name,
)
from merge_worker.inputs.validation import load_inputs
from merge_worker.progress import ModuleProgress, log
from merge_worker.output.ownership import Owner
from merge_worker.run import Log, Outcome, _write_adapter, merge_params, pick_device, run_merge
from merge_worker.search.progress import progress_line
from merge_worker.search.space import Candidate, Sampler, candidate_spec, grid_size
from merge_worker.spec import AdapterMergeSpec, SpecError, parse_spec
from merge_worker.inputs.volumes import Volumes

TRIAL = "search-trial"  # the attached candidate's adapter name; never a source's (source_adapter_name)


@dataclass
class Trial:
    number: int
    candidate: Candidate
    retention: dict[str, float | None]
    score: float | None  # None: no dataset has a defined retention
    feasible: bool  # every defined retention at least evaluation.minRetention
    seconds: float

    def rank_key(self) -> tuple[bool, float]:
        return self.feasible, -math.inf if self.score is None else self.score

    def trial_score(self) -> float | None:
        return None if self.score is None else round(self.score, 6)

    def record(self) -> dict[str, Any]:
        return {"trial": self.number, **self.candidate.as_dict(),
                "retention": {k: None if v is None else round(v, 6) for k, v in self.retention.items()},
                "score": self.trial_score(), "feasible": self.feasible,
                "seconds": round(self.seconds, 3)}


def objective(spec: AdapterMergeSpec, retentions: dict[str, float | None]) -> float | None:
    """The search's score of one candidate from its retention per dataset (undefined ones left out)."""
    search = spec.search
    defined = {k: v for k, v in retentions.items() if v is not None and math.isfinite(v)}
    if not defined:
        return None
    if search.objective == "worst":
        return min(defined.values())
    weights = {k: (search.dataset_weights or {}).get(k, 1.0) for k in defined}
    total = sum(weights.values())
    return sum(weights[k] * v for k, v in defined.items()) / total if total > 0 else None


def run_search(spec: AdapterMergeSpec, volumes: Volumes, *, device: str = "auto", print_out: Log = print,
               tty: bool | None = None, owner: Owner | None = None, spec_file: Path | None = None,
               provenance: dict[str, Any] | None = None) -> Outcome:
    """Searches, then writes the best candidate like a plain merge (its manifest adds `provenance` and the
    search record). SpecError: bad input, nothing written."""
    started = time.monotonic()
    search = spec.search
    assert search is not None and spec.evaluation is not None
    inputs = load_inputs(spec, volumes, owner=owner, spec_file=spec_file)
    torch_device = pick_device(device)
    rows = read_datasets(spec, volumes, "search")
    report_sizes = {name: len(r) for name, r in read_datasets(spec, volumes, "report").items()}
    sampler = Sampler(search, len(spec.adapters))
    budget = search.trials if search.strategy != "grid" else min(search.trials, 1 + grid_size(search.space, len(spec.adapters)))
    log(f"search: {search.strategy}, up to {budget} trials"
        + (f" or {search.seconds:g} s" if search.seconds else "") + f", objective {search.objective}; search split "
        + ", ".join(f"{n} {len(r)} (report {report_sizes[n]})" for n, r in rows.items()))

    scorer, loaded = load_scorer(spec, volumes, torch_device, log)
    examples = {n: [encode(scorer.tokenizer, r["prompt"], r["completion"]) for r in rs] for n, rs in rows.items()}
    datasets = spec.evaluation.datasets
    reference = scorer.losses(
        [Task((d.name, "base"), examples[d.name]) for d in datasets]
        + [Task((d.name, "source"), examples[d.name], source_adapter_name(d.adapter)) for d in datasets])

    trials: list[Trial] = []
    skipped: list[dict[str, Any]] = []
    seen: set[Candidate] = set()
    # The spec's own method and parameters first: the search never ends below the plain merge it replaces.
    proposals = _proposals(spec, sampler)
    attempts = 0
    best: Trial | None = None
    while len(trials) < budget and attempts < 20 * budget:
        if trials and search.seconds is not None and time.monotonic() - started >= search.seconds:
            log(f"search: time budget of {search.seconds:g} s spent after {len(trials)} trials")
            break
        candidate = next(proposals, None)
        if candidate is None:
            break
        attempts += 1
        if candidate in seen:  # a repeat of a list value: same score, not another trial
            sampler.tell(candidate, next(t for t in trials if t.candidate == candidate).score or -1e9)
            continue
        seen.add(candidate)
        trial = _score_candidate(spec, inputs, candidate, scorer, examples, reference, torch_device,
                                 len(trials) + 1, skipped)
        if trial is None:
            sampler.tell(candidate, -1e9)
            continue
        trials.append(trial)
        sampler.tell(candidate, -1e9 if trial.score is None else trial.score)
        if best is None or trial.rank_key() > best.rank_key():
            best = trial
        log(f"search: trial {trial.number} of {budget}: {candidate.describe()} score {_fmt(trial.score)}"
            f" ({trial.seconds:.1f} s); best so far trial {best.number}, {best.candidate.describe()},"
            f" score {_fmt(best.score)}")
        print(progress_line(trial.number, budget, best.number, best.candidate.as_dict(), best.score),
              file=sys.stderr, flush=True)
    scorer.model = loaded = None  # the final evaluation loads its own
    release_memory(torch_device)
    if best is None:
        raise RuntimeError("search: no candidate could be merged: "
                           + "; ".join(s["error"] for s in skipped[:3]))

    search_seconds = time.monotonic() - started
    log(f"search: chose trial {best.number} of {len(trials)}, {best.candidate.describe()}, score"
        f" {_fmt(best.score)} on the search split; writing it and evaluating it on the report split")
    chosen = parse_spec(candidate_spec(spec, best.candidate))
    record = {"strategy": search.strategy, "objective": search.objective, "seed": search.seed,
              "selectionFraction": search.selection_fraction,
              "split": {n: {"search": len(r), "report": report_sizes[n]} for n, r in rows.items()},
              "seconds": round(search_seconds, 3), "best": {"trial": best.number, **best.candidate.as_dict(),
                                                            "score": best.trial_score()},
              "trials": [t.record() for t in trials], "skipped": skipped}
    outcome = run_merge(chosen, volumes, device=device, print_out=print_out, tty=tty, owner=owner,
                        spec_file=spec_file, provenance={**(provenance or {}), "search": record})
    outcome.result["search"] = {"best": {"trial": best.number, **best.candidate.as_dict()}, "score": best.trial_score(),
                                "trials": len(trials)}
    print_out(f"search: {len(trials)} trials in {search_seconds:.1f} s; best {best.candidate.describe()}"
              f" (search-split score {_fmt(best.score)})")
    return outcome


def _proposals(spec: AdapterMergeSpec, sampler: Sampler):
    yield Candidate.of(spec.method, {})
    while (candidate := sampler.ask()) is not None:
        yield candidate


def _score_candidate(spec: AdapterMergeSpec, inputs: Any, candidate: Candidate, scorer: Any,
                     examples: dict[str, list[Any]], reference: dict[Any, float], device: torch.device,
                     number: int, skipped: list[dict[str, Any]]) -> Trial | None:
    """Merges and scores one candidate; None (recorded in `skipped`) when its spec is invalid."""
    started = time.monotonic()
    try:
        candidate_spec_ = parse_spec(candidate_spec(spec, candidate, keep_search=False))
    except SpecError as exc:
        skipped.append({**candidate.as_dict(), "error": str(exc)})
        log(f"search: skipped {candidate.describe()}: {exc}")
        return None
    quiet = ModuleProgress(len(inputs.plan), stream=io.StringIO(), tty=False)
    with tempfile.TemporaryDirectory(prefix="adaptermerge-trial-") as folder:
        _write_adapter(dataclasses.replace(inputs, spec=candidate_spec_), Path(folder), device, quiet,
                       merge_params(candidate_spec_))
        scorer.attach(TRIAL, Path(folder))
    try:
        losses = scorer.losses([Task(d.name, examples[d.name], TRIAL) for d in spec.evaluation.datasets])
    finally:
        scorer.detach(TRIAL)
    retentions = {d.name: retention(reference[d.name, "base"], reference[d.name, "source"], losses[d.name])
                  for d in spec.evaluation.datasets}
    threshold = spec.evaluation.min_retention
    feasible = threshold is None or all(r is None or r >= threshold for r in retentions.values())
    return Trial(number, candidate, retentions, objective(spec, retentions), feasible, time.monotonic() - started)


def _fmt(score: float | None) -> str:
    return "undefined" if score is None else f"{score:.4f}"
