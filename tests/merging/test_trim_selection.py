"""The radix threshold selection of merge_worker.trim equals the plain sort-based definition."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from merge_worker import trim
from merging import reference


def sorted_kth_largest(x: torch.Tensor, k: int) -> float:
    return float(x.abs().flatten().sort(descending=True).values[k - 1])


@st.composite
def tensors_with_k(draw):
    """Random tensors, often with repeated values, zeros and both signs, and a k in [1, numel]."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n = draw(st.integers(1, 3000))
    palette = draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=20))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):  # few distinct values: many ties at the threshold
        values = torch.tensor(palette, dtype=dtype)
        x = values[torch.randint(len(palette), (n,), generator=generator)]
    else:
        x = torch.randn(n, generator=generator, dtype=dtype) * 10.0 ** draw(st.integers(-20, 20))
    return x, draw(st.integers(1, n))


@settings(max_examples=150, deadline=None)
@given(tensors_with_k())
def test_radix_selection_equals_sort(data):
    x, k = data
    # sort_at_most=4 makes the radix passes run on small tensors too (normally they are just sorted).
    assert float(trim.kth_largest_magnitude(x, k, sort_at_most=4)) == sorted_kth_largest(x, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 1000, 123_456, 249_999, 250_000])
def test_large_tensor_selection_equals_sort(dtype, k):
    x = torch.randn(500, 500, generator=torch.Generator().manual_seed(k), dtype=dtype).pow(3)
    assert float(trim.kth_largest_magnitude(x, k)) == sorted_kth_largest(x, k)


def test_k_outside_the_tensor_keeps_nothing_or_everything():
    x = torch.randn(100)
    assert trim.kth_largest_magnitude(x, 0) == float("inf")
    assert trim.kth_largest_magnitude(x, 100) == x.abs().min()


@settings(max_examples=60, deadline=None)
@given(tensors_with_k(), st.floats(0.01, 1.0))
def test_trim_equals_reference_and_keeps_round_density_numel(data, density):
    x, _ = data
    want = reference.trim(x.double(), density)
    got = trim.trim_(x.clone(), density)
    assert torch.equal(got.double(), want)
    if torch.unique(x.abs()).numel() == x.numel() and bool((x != 0).all()):
        assert int((got != 0).sum()) == round(density * x.numel())  # no ties: exactly that many kept
