"""What `status.search` says for a resource with spec.search (docs/operator.md, "Search"). Pure functions.

While the Job runs: the progress the worker's last log marker states (read by search_progress.py):
trials scored so far, the trial budget, the best candidate and its search-split score. Once the worker
reported: the chosen candidate, its score and the trial count from its result summary (docs/interfaces.md
#5, key `search`). Both are parsed with the strict models of merge_worker/search/progress.py: anything
else is ignored, never copied.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from merge_worker.search.progress import Count, Number, SearchChoice, SearchProgress

KEY = "search"


class SearchSummary(BaseModel):
    """The worker's result summary's `search`: what the run chose."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    best: SearchChoice
    score: Number | None = None
    trials: Count


def from_progress(progress: SearchProgress) -> dict[str, Any]:
    return {"trials": progress.trial, "budget": progress.trials, "bestScore": progress.best_score,
            "best": progress.best.model_dump(exclude_none=True)}


def from_summary(report: Mapping[str, Any] | None) -> dict[str, Any] | None:
    try:
        summary = SearchSummary.model_validate((report or {}).get(KEY))
    except ValidationError:
        return None
    return {"trials": summary.trials, "bestScore": summary.score, "best": summary.best.model_dump(exclude_none=True)}


def desired(previous: Mapping[str, Any], run: str, report: Mapping[str, Any] | None, finished: bool) -> dict | None:
    """status.search for the run `run`: the summary's once finished, else the progress written before
    for the same run (a new run starts without one)."""
    if finished and (final := from_summary(report)):
        return final
    before = previous.get(KEY)
    return dict(before) if previous.get("jobName") == run and isinstance(before, Mapping) else None
