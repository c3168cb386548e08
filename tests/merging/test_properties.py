"""Properties every merge must have, checked on random adapters (hypothesis)."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from merge_worker.factors import LoraFactors, MergeParams
from merge_worker.merge_engine import merge_modules
from merge_worker.methods.dare_linear import drop_and_rescale_

CPU = torch.device("cpu")


@st.composite
def adapters(draw, min_adapters=1, max_adapters=4):
    """One module's factors for min..max adapters of one shape (float32)."""
    out_f, in_f = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = draw(st.integers(min_adapters, max_adapters))
    factors = []
    for _ in range(n):
        r = draw(st.integers(1, 6))
        scale = draw(st.floats(0.1, 8.0))
        factors.append(LoraFactors(a=torch.randn(r, in_f, generator=generator),
                                   b=torch.randn(out_f, r, generator=generator), scale=scale))
    return factors


def merged_delta(factors, params: MergeParams, rank=10_000, name="m") -> torch.Tensor:
    [(_, module)] = merge_modules([(name, factors)], params, rank=rank, energy=0.99, device=CPU)
    return module.b @ module.a


def close(x: torch.Tensor, y: torch.Tensor, tol=1e-4) -> bool:
    return float((x - y).norm()) <= tol * max(float(y.norm()), 1e-30)


@st.composite
def weights_summing_to_one(draw, n):
    raw = [draw(st.floats(0.05, 1.0)) for _ in range(n)]
    return tuple(w / sum(raw) for w in raw)


@settings(max_examples=40, deadline=None)
@given(adapters(max_adapters=1), st.integers(1, 4), st.sampled_from(["linear", "ties"]), st.data())
def test_copies_of_one_adapter_with_weights_summing_to_one_give_it_back(one, copies, method, data):
    weights = data.draw(weights_summing_to_one(copies))
    params = MergeParams(method=method, weights=weights, density=1.0)
    assert close(merged_delta(one * copies, params), one[0].delta())


@settings(max_examples=40, deadline=None)
@given(adapters(min_adapters=2, max_adapters=2), st.sampled_from([0.0, 1.0]), st.booleans())
def test_slerp_at_the_ends_gives_the_inputs(pair, t, parallel):
    a, b = pair
    if parallel:  # b = 2a: the linear fallback
        b = LoraFactors(a=a.a, b=2 * a.b, scale=a.scale)
    params = MergeParams(method="slerp", weights=(1.0, 1.0), t=t)
    want = a.delta() if t == 0 else b.delta()
    assert close(merged_delta([a, b], params), want)


@settings(max_examples=40, deadline=None)
@given(adapters(), st.integers(0, 1000), st.data())
def test_dare_with_density_one_equals_linear_and_ties(factors, seed, data):
    weights = tuple(data.draw(st.floats(0.1, 2.0)) for _ in factors)
    linear = merged_delta(factors, MergeParams(method="linear", weights=weights))
    dare = merged_delta(factors, MergeParams(method="dare_linear", weights=weights, density=1.0, seed=seed))
    assert close(dare, linear)
    ties = merged_delta(factors, MergeParams(method="ties", weights=weights, density=1.0))
    dare_ties = merged_delta(factors, MergeParams(method="dare_ties", weights=weights, density=1.0, seed=seed))
    assert close(dare_ties, ties)


@settings(max_examples=25, deadline=None)
@given(adapters(), st.integers(0, 2**40), st.floats(0.1, 0.9), st.sampled_from(["dare_linear", "dare_ties"]))
def test_the_same_dare_seed_gives_identical_bytes(factors, seed, density, method):
    params = MergeParams(method=method, weights=(1.0,) * len(factors), density=density, seed=seed)
    runs = [list(merge_modules([("m", factors)], params, rank=4, energy=0.99, device=CPU)) for _ in range(2)]
    (_, first), (_, second) = runs[0][0], runs[1][0]
    assert torch.equal(first.b, second.b) and torch.equal(first.a, second.a)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(0, 2**40), st.floats(0.05, 0.95))
def test_dare_masks_do_not_depend_on_batching_or_order(n_adapters, n_modules, seed, density):
    keys = [f"layers.{m}.q_proj" for m in range(n_modules)]
    taus = torch.randn(n_adapters, n_modules, 6, 5, generator=torch.Generator().manual_seed(3)) + 3
    batched = drop_and_rescale_(taus.clone(), density, seed, keys)
    for m in reversed(range(n_modules)):  # one module at a time, in reverse order
        alone = drop_and_rescale_(taus[:, m:m + 1].clone(), density, seed, keys[m:m + 1])
        assert torch.equal(alone[:, 0], batched[:, m])


def test_another_dare_seed_drops_other_entries():
    taus = torch.randn(2, 1, 50, 40, generator=torch.Generator().manual_seed(0))
    first = drop_and_rescale_(taus.clone(), 0.5, 1, ["m"])
    second = drop_and_rescale_(taus.clone(), 0.5, 2, ["m"])
    assert not torch.equal(first == 0, second == 0)
    assert abs(float((first == 0).float().mean()) - 0.5) < 0.05  # p = 1 - density of them dropped
    kept = first != 0
    assert torch.allclose(first[kept], taus[kept] / 0.5)  # survivors rescaled by 1/density
