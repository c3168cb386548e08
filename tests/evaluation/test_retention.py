"""Retention = (L_base - L_merged) / (L_base - L_source), undefined when the source does not help."""

from __future__ import annotations

import math

import pytest

from merge_worker.evaluation.scoring import retention


@pytest.mark.parametrize(
    ("base", "source", "merged", "expected"),
    [
        (2.0, 1.0, 1.0, 1.0),  # kept everything
        (2.0, 1.0, 2.0, 0.0),  # kept nothing
        (2.0, 1.0, 1.5, 0.5),
        (3.0, 1.0, 2.5, 0.25),
        (2.0, 1.0, 2.5, -0.5),  # the merge is worse than the base
        (2.0, 1.5, 1.0, 2.0),  # the merge beats the source itself
    ],
)
def test_defined_values(base, source, merged, expected):
    assert retention(base, source, merged) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("base", "source", "merged"),
    [
        (2.0, 2.0, 1.0),  # source equal to the base: 0/0 territory
        (2.0, 2.5, 1.0),  # source worse than the base
        (2.0, math.nan, 1.0),
        (math.inf, 1.0, 1.0),
        (2.0, 1.0, math.nan),
    ],
)
def test_undefined_when_the_source_is_no_better_than_the_base(base, source, merged):
    assert retention(base, source, merged) is None
