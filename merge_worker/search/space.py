"""The candidates of a search: one method and its parameter values, the spec that merges them, and the
strategies that propose them (grid, random, Optuna's TPE)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# spec.search.space[] field -> the key of spec.parameters it sets (weights: one value per adapter).
PARAMETERS = (("density", "density"), ("lambda_", "lambda"), ("t", "t"))


@dataclass(frozen=True)
class Candidate:
    method: str
    parameters: tuple[tuple[str, Any], ...] = field(default=())  # sorted (key, value); weights a tuple

    @staticmethod
    def of(method: str, parameters: dict[str, Any]) -> Candidate:
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in parameters.items()}
        return Candidate(method, tuple(sorted(values.items())))

    def as_dict(self) -> dict[str, Any]:
        """{method, parameters} as spec fields (camelCase), numbers rounded for reading."""
        return {"method": self.method, "parameters": {
            k: [round(w, 6) for w in v] if isinstance(v, tuple) else round(v, 6) for k, v in self.parameters
        }}

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v}" for k, v in self.as_dict()["parameters"].items())
        return self.method + (f" ({shown})" if shown else "")


def candidate_spec(spec: Any, candidate: Candidate, *, keep_search: bool = True) -> dict[str, Any]:
    """The spec (as a YAML mapping) that merges `candidate`: spec.method and spec.parameters replaced
    where the candidate sets them; per-adapter weights move to parameters.weights."""
    data = spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if not keep_search:
        data.pop("search", None)
    data["method"] = candidate.method
    parameters = dict(data.get("parameters") or {})
    for key, value in candidate.parameters:
        parameters[key] = list(value) if isinstance(value, tuple) else value
    if "weights" in dict(candidate.parameters):
        data["adapters"] = [{k: v for k, v in a.items() if k != "weight"} for a in data["adapters"]]
    data["parameters"] = parameters
    return data


def _dimensions(entry: Any, adapters: int) -> list[tuple[str, Any]]:
    """(parameter key, SearchValues) for every searched parameter; weights give one per adapter."""
    dims = [(key, getattr(entry, attr)) for attr, key in PARAMETERS if getattr(entry, attr) is not None]
    if entry.weights is not None:
        dims += [(f"weights[{i}]", entry.weights) for i in range(adapters)]
    return dims


def _assemble(method: str, values: dict[str, float], adapters: int) -> Candidate:
    parameters: dict[str, Any] = {k: v for k, v in values.items() if not k.startswith("weights[")}
    if any(k.startswith("weights[") for k in values):
        parameters["weights"] = [values[f"weights[{i}]"] for i in range(adapters)]
    return Candidate.of(method, parameters)


def _grid_values(values: Any) -> list[float]:
    if values.values is not None:
        return list(values.values)
    if values.steps == 1 or values.min == values.max:
        return [(values.min + values.max) / 2]
    step = (values.max - values.min) / (values.steps - 1)
    return [values.min + i * step for i in range(values.steps)]


def corner_candidates(entry: Any, adapters: int) -> list[Candidate]:
    """The lowest and the highest value of every parameter of one space entry."""
    dims = _dimensions(entry, adapters)
    return [_assemble(entry.method, {k: v.bounds()[side] for k, v in dims}, adapters) for side in (0, 1)]


def grid(space: list[Any], adapters: int) -> Iterator[Candidate]:
    """Every combination, entry by entry, in the order the spec lists them."""
    for entry in space:
        dims = _dimensions(entry, adapters)
        for combo in itertools.product(*[_grid_values(v) for _, v in dims]):
            yield _assemble(entry.method, dict(zip([k for k, _ in dims], combo)), adapters)


def grid_size(space: list[Any], adapters: int) -> int:
    total = 0
    for entry in space:
        count = 1
        for _, values in _dimensions(entry, adapters):
            count *= len(_grid_values(values))
        total += count
    return total


class Sampler:
    """Proposes candidates (ask) and learns their scores (tell); ask returns None when exhausted."""

    def __init__(self, search: Any, adapters: int):
        self.search, self.adapters = search, adapters
        self._grid = grid(search.space, adapters) if search.strategy == "grid" else None
        self._random = random.Random(search.seed)
        self._study = None
        self._pending: dict[Candidate, list[Any]] = {}
        if search.strategy == "tpe":
            try:
                import optuna
            except ImportError:
                raise RuntimeError("spec.search.strategy tpe needs the optuna package, which is not"
                                   " installed (pip install optuna); grid and random need nothing") from None
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._study = optuna.create_study(direction="maximize",
                                              sampler=optuna.samplers.TPESampler(seed=search.seed))

    def ask(self) -> Candidate | None:
        if self._grid is not None:
            return next(self._grid, None)
        if self._study is not None:
            return self._ask_tpe()
        entry = self._random.choice(self.search.space)
        values = {}
        for key, v in _dimensions(entry, self.adapters):
            values[key] = self._random.choice(v.values) if v.values is not None else self._random.uniform(v.min, v.max)
        return _assemble(entry.method, values, self.adapters)

    def _ask_tpe(self) -> Candidate:
        trial = self._study.ask()
        space = self.search.space
        index = trial.suggest_categorical("space", list(range(len(space)))) if len(space) > 1 else 0
        values = {}
        for key, v in _dimensions(space[index], self.adapters):
            name = f"{index}.{key}"
            values[key] = (trial.suggest_categorical(name, list(v.values)) if v.values is not None
                           else trial.suggest_float(name, v.min, v.max))
        candidate = _assemble(space[index].method, values, self.adapters)
        self._pending.setdefault(candidate, []).append(trial)
        return candidate

    def tell(self, candidate: Candidate, score: float) -> None:
        if self._study is not None:
            for trial in self._pending.pop(candidate, []):
                self._study.tell(trial, score)
