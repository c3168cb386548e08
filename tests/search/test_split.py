"""The selection/report split: disjoint, complete, deterministic, by content."""

from __future__ import annotations

import json

import pytest

from merge_worker.search.split import in_search_split, split_part

ROWS = [{"prompt": f"p{i}", "completion": f"c{i % 7}"} for i in range(400)]


@pytest.mark.parametrize("seed,fraction", [(0, 0.5), (1, 0.5), (3, 0.2), (9, 0.9)])
def test_splits_are_disjoint_and_complete(seed, fraction):
    search = split_part(ROWS, "search", seed, fraction)
    report = split_part(ROWS, "report", seed, fraction)
    keys = lambda rows: {json.dumps(r, sort_keys=True) for r in rows}  # noqa: E731
    assert keys(search).isdisjoint(keys(report))
    assert len(search) + len(report) == len(ROWS)
    assert abs(len(search) / len(ROWS) - fraction) < 0.1  # a hash, so roughly the fraction


def test_split_is_deterministic_and_moves_with_the_seed():
    assert split_part(ROWS, "search", 0, 0.5) == split_part(list(ROWS), "search", 0, 0.5)
    assert split_part(ROWS, "search", 0, 0.5) != split_part(ROWS, "search", 1, 0.5)


def test_split_is_by_content_so_copies_and_reordering_stay_on_their_side():
    row = ROWS[5]
    side = in_search_split(row, 0, 0.5)
    assert all(in_search_split(dict(row), 0, 0.5) == side for _ in range(3))
    reordered = list(reversed(ROWS)) + [row, row]
    report = split_part(reordered, "report", 0, 0.5)
    assert (row in report) != side and report.count(row) in (0, 3)
