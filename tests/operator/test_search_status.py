"""status.search (operator/adaptermerge_operator/search_status.py) and the worker's progress marker
(merge_worker/search/progress.py): only a strictly valid summary or marker line gets into the status."""

from __future__ import annotations

import json

import pytest

from merge_worker.search.progress import MARKER, MAX_LINE, last_progress, parse_progress_line, progress_line

from adaptermerge_operator import search_status, status

SEARCH = {"strategy": "random", "trials": 4, "space": [{"method": "ties", "density": {"min": 0.2, "max": 0.9}}]}
CHOSEN = {"best": {"trial": 3, "method": "ties", "parameters": {"density": 0.61, "weights": [0.9, 1.1]}},
          "score": 0.83, "trials": 4}


def finished_status(objects, summary_search, spec_search=SEARCH) -> dict:
    spec = {**objects.SPEC, "search": spec_search, "baseModel": {"path": "models/base"},
            "evaluation": {"datasets": [{"name": "coder", "path": "eval/c.jsonl", "adapter": "coder"}]}}
    message = json.loads(objects.summary(0, "merged"))
    if summary_search is not None:
        message["search"] = summary_search
    job = objects.job(conditions=[objects.condition("Complete")], completionTime="2030-01-01T00:01:00Z")
    pod = objects.pod(phase="Succeeded", state=objects.terminated(0, json.dumps(message)))
    return status.desired_status(objects.merge(spec), [job], [pod], "2030-01-01T00:02:00Z")


def test_a_finished_search_reports_the_chosen_candidate_score_and_trials(objects):
    assert finished_status(objects, CHOSEN)["search"] == {
        "trials": 4, "bestScore": 0.83,
        "best": {"trial": 3, "method": "ties", "parameters": {"density": 0.61, "weights": [0.9, 1.1]}}}


@pytest.mark.parametrize("bad", [
    {**CHOSEN, "best": {**CHOSEN["best"], "method": "rm -rf"}},        # not a method
    {**CHOSEN, "score": 1e300},                                         # out of bounds
    {**CHOSEN, "trials": 0},
    {**CHOSEN, "extra": "x" * 100},                                     # unknown key
    {**CHOSEN, "best": {**CHOSEN["best"], "parameters": {"Evil key": 1.0}}},
    {**CHOSEN, "best": {**CHOSEN["best"], "parameters": {"weights": [1.0] * 65}}},
    "a string",
])
def test_a_summary_search_that_is_not_strictly_valid_is_left_out(objects, bad):
    finished = finished_status(objects, bad)
    assert finished["phase"] == "Succeeded" and "search" not in finished


def test_progress_is_kept_for_its_run_only(objects):
    progress = {"trials": 2, "budget": 4, "bestScore": 0.5, "best": {"trial": 1, "method": "ties", "parameters": {}}}
    previous = {"jobName": "dev-1", "search": progress}
    assert search_status.desired(previous, "dev-1", None, False) == progress
    assert search_status.desired(previous, "dev-2", None, False) is None  # a new run starts without one
    assert search_status.desired(previous, "dev-1", {"search": CHOSEN}, True)["trials"] == 4


def test_the_marker_round_trips_and_nothing_else_parses():
    line = progress_line(3, 10, 2, {"method": "ties", "parameters": {"density": 0.5}}, 0.812345678)
    parsed = parse_progress_line(line)
    assert search_status.from_progress(parsed) == {
        "trials": 3, "budget": 10, "bestScore": 0.812346,
        "best": {"trial": 2, "method": "ties", "parameters": {"density": 0.5}}}
    body = line[len(MARKER):]
    assert parse_progress_line("adaptermerge: " + line) is None       # a marker inside another line
    assert parse_progress_line(MARKER + body[:-1]) is None            # cut JSON (a byte-limited tail)
    assert parse_progress_line(MARKER + body.replace('"trial":3', '"trial":-3')) is None
    assert parse_progress_line(MARKER + json.dumps({**json.loads(body), "x": 1})) is None
    padded = json.loads(body)
    padded["best"]["parameters"]["weights"] = [1.0] * 64 + [1.0]
    assert parse_progress_line(MARKER + json.dumps(padded)) is None   # more weights than allowed
    assert parse_progress_line(MARKER + body + " " * MAX_LINE) is None  # valid JSON, but over MAX_LINE bytes
    older = progress_line(2, 10, 2, {"method": "ties", "parameters": {}}, 0.8)
    assert last_progress(f"{older}\nadaptermerge: merged 3/4 modules\n{line}\n{MARKER}{{broken\n").trial == 3
