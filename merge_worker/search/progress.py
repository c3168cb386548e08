"""The search's progress line: one strict single-line JSON marker the worker prints after every trial
(docs/search.md, "Progress"), which the operator reads from the tail of the worker pod's log into
`status.search` while the Job runs (operator/adaptermerge_operator/search_progress.py).

The log is text anyone who controls the worker's inputs can put words into (a path or an error message
echoed in a log line), so the reader trusts nothing but a whole line that starts with MARKER and
parses as exactly this model: bounded numbers, a known method, a few short parameter names, and a
bounded length. No torch here: the operator imports this module.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from merge_worker.spec import METHODS

MARKER = "adaptermerge-search-progress "
MAX_LINE = 2048  # bytes; a longer line is not a marker
MAX_TRIALS = 100_000

Count = Annotated[int, Field(ge=1, le=MAX_TRIALS)]
ParameterName = Annotated[str, Field(pattern=r"^[a-z][a-zA-Z]{0,15}$")]
Number = Annotated[float, Field(ge=-1e6, le=1e6, allow_inf_nan=False)]
ParameterValue = Number | Annotated[list[Number], Field(max_length=64)]


class SearchChoice(BaseModel):
    """One candidate: a method and the parameters it sets."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    trial: Count | None = None
    method: str
    parameters: Annotated[dict[ParameterName, ParameterValue], Field(max_length=8)] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}")
        return value


class SearchProgress(BaseModel):
    """After trial `trial` of at most `trials`: the best candidate so far and its search-split score."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    trial: Count
    trials: Count
    best_score: Number | None = Field(alias="bestScore")
    best: SearchChoice


def progress_line(trial: int, trials: int, best_trial: int, best: dict[str, Any], best_score: float | None) -> str:
    """The marker line for the log (best: Candidate.as_dict(), {method, parameters})."""
    score = None if best_score is None or not math.isfinite(best_score) else round(best_score, 6)
    progress = SearchProgress(trial=trial, trials=trials, bestScore=score, best={"trial": best_trial, **best})
    return MARKER + progress.model_dump_json(by_alias=True)


def parse_progress_line(line: str) -> SearchProgress | None:
    """The progress a whole log line states, or None when the line is anything else."""
    line = line.rstrip("\r\n")
    if not line.startswith(MARKER) or len(line.encode()) > MAX_LINE:
        return None
    try:
        return SearchProgress.model_validate_json(line[len(MARKER):])
    except ValidationError:
        return None


def last_progress(log_tail: str) -> SearchProgress | None:
    """The newest (last) valid marker in a log tail."""
    found = [p for p in map(parse_progress_line, log_tail.splitlines()) if p is not None]
    return found[-1] if found else None
