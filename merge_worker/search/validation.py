"""Checks of spec.search that need the whole spec (called from AdapterMergeSpec's validator): every
field error names its path under spec.search."""

from __future__ import annotations

import math
from typing import Any

from merge_worker.search.space import candidate_spec, corner_candidates


def check_search(spec: Any, field_error: type[ValueError]) -> None:
    from merge_worker.spec import SEARCH_PARAMETER_METHODS

    search = spec.search
    if spec.evaluation is None:
        raise field_error("search", "search needs spec.evaluation to score candidates")
    if spec.output.format != "adapter":
        raise field_error("search", "search writes an adapter (output.format adapter); merge the chosen"
                          " adapter into the model in a second step")
    if search.strategy == "tpe":
        import importlib.util

        # Decided with the other input checks (validate == run), not as a crash after the base is loaded.
        if importlib.util.find_spec("optuna") is None:
            raise field_error("search.strategy", "tpe needs the optuna package, which this installation"
                              " lacks (pip install optuna); grid and random need nothing")
    names = [d.name for d in spec.evaluation.datasets]
    if search.dataset_weights is not None:
        if search.objective != "mean":
            raise field_error("search.datasetWeights", "only the mean objective weighs datasets")
        for name, weight in search.dataset_weights.items():
            if name not in names:
                raise field_error(f"search.datasetWeights.{name}", "not a dataset of spec.evaluation.datasets")
            if not (math.isfinite(weight) and weight >= 0):
                raise field_error(f"search.datasetWeights.{name}", "must be a finite number >= 0")
        if sum(search.dataset_weights.get(n, 1.0) for n in names) <= 0:
            raise field_error("search.datasetWeights", "the weights add up to 0")
    limits = {"density": (0.0, 1.0, False), "t": (0.0, 1.0, True)}  # (low, high, low included)
    for i, entry in enumerate(search.space):
        for name, methods in SEARCH_PARAMETER_METHODS.items():
            if getattr(entry, name) is not None and entry.method not in methods:
                raise field_error(f"search.space[{i}].{name}", f"method {entry.method} does not use it")
        for name, (low, high, low_included) in limits.items():
            values = getattr(entry, name)
            if values is not None:
                lo, hi = values.bounds()
                if hi > high or lo < low or (lo == low and not low_included):
                    side = "[" if low_included else "("
                    raise field_error(f"search.space[{i}].{name}", f"must lie in {side}{low}, {high}]")
        # The extremes of the space must make valid merges (slerp's two adapters, della's density
        # against epsilon, a density where the method needs one...).
        for candidate in corner_candidates(entry, len(spec.adapters)):
            problem = candidate_problem(spec, candidate)
            if problem:
                raise field_error(f"search.space[{i}]", f"{candidate.describe()} is not a valid merge: {problem}")


def candidate_problem(spec: Any, candidate: Any) -> str | None:
    """Why the candidate's spec is invalid, or None."""
    from merge_worker.spec import SpecError, parse_spec

    try:
        parse_spec(candidate_spec(spec, candidate, keep_search=False))
    except SpecError as exc:
        return str(exc)
    return None
