"""Re-factoring merged deltas: randomized SVD quality, rank auto, errors, clamping, balance."""

from __future__ import annotations

import pytest
import torch

from merge_worker import refactor
from merge_worker.factors import MergeParams
from merge_worker.merge_engine import merge_dense
from merging import reference


def optimal_error(delta: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return float(s[k:].norm() / s.norm())


def measured_error(delta: torch.Tensor, module) -> float:
    return float((delta.double() - (module.b @ module.a).double()).norm() / delta.double().norm())


def ties_of_random_adapters(out_f, in_f, seed) -> torch.Tensor:
    """A realistic dense delta: TIES of four random rank-16 adapters (float32)."""
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(out_f, 16, generator=g) @ torch.randn(16, in_f, generator=g) / 16 for _ in range(4)]
    return merge_dense(taus, MergeParams(method="ties", weights=(1.0,) * 4, density=0.5), key="m")


def decaying_spectrum(out_f, in_f, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out_f, out_f, generator=g)).Q
    v = torch.linalg.qr(torch.randn(in_f, in_f, generator=g)).Q
    n = min(out_f, in_f)
    s = torch.logspace(0, -3, n)
    return (u[:, :n] * s) @ v[:, :n].T


@pytest.mark.parametrize("make", [ties_of_random_adapters, decaying_spectrum])
@pytest.mark.parametrize("shape", [(300, 200), (160, 400)])
@pytest.mark.parametrize("rank", [4, 16])
def test_randomized_svd_is_within_2_percent_of_optimal(make, shape, rank):
    delta = make(*shape, seed=rank)
    [module] = refactor.factor_dense(delta[None], rank, 0.99, exact=False)
    optimal = optimal_error(delta, rank)
    assert module.rank == rank
    assert measured_error(delta, module) <= 1.02 * optimal
    assert module.relative_error == pytest.approx(measured_error(delta, module), rel=1e-3)


def test_batched_randomized_svd_equals_one_module_at_a_time():
    deltas = torch.stack([ties_of_random_adapters(120, 90, seed) for seed in range(3)])
    batched = refactor.factor_dense(deltas, 8, 0.99, exact=False)
    for delta, module in zip(deltas, batched):
        [alone] = refactor.factor_dense(delta[None], 8, 0.99, exact=False)
        assert torch.allclose(module.b @ module.a, alone.b @ alone.a, atol=1e-5 * float(delta.abs().max()))


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_rank_auto_on_dense_deltas_keeps_at_least_energy(exact, energy):
    delta = decaying_spectrum(200, 150, seed=3).double()
    [module] = refactor.factor_dense(delta[None], "auto", energy, exact=exact)
    kept = 1 - measured_error(delta, module) ** 2
    assert kept >= energy - 1e-9
    s2 = torch.linalg.svdvals(delta) ** 2
    if exact:  # and the exact path keeps no more directions than needed
        assert float(s2[: module.rank - 1].sum() / s2.sum()) < energy
    assert module.rank < 150


@pytest.mark.parametrize("energy", [0.3, 0.8, 0.95])
def test_rank_auto_on_low_rank_sums_is_the_smallest_rank_keeping_energy(energy):
    g = torch.Generator().manual_seed(5)
    bs = [torch.randn(60, r, generator=g, dtype=torch.float64) for r in (3, 5)]
    as_ = [torch.randn(r, 50, generator=g, dtype=torch.float64) for r in (3, 5)]
    coeffs = [0.7, -1.2]
    delta = sum(c * b @ a for c, b, a in zip(coeffs, bs, as_))
    module = refactor.factor_low_rank(bs, as_, coeffs, "auto", energy)
    s2 = torch.linalg.svdvals(delta) ** 2
    assert float(s2[: module.rank].sum() / s2.sum()) >= energy
    assert float(s2[: module.rank - 1].sum() / s2.sum()) < energy
    assert module.relative_error == pytest.approx(measured_error(delta, module), rel=1e-9)


def test_low_rank_factoring_never_forms_the_full_matrix():
    # A 200000 x 300000 float32 delta would take 240 GB: factoring it must only touch the factors.
    g = torch.Generator().manual_seed(0)
    bs = [torch.randn(200_000, 2, generator=g), torch.randn(200_000, 3, generator=g)]
    as_ = [torch.randn(2, 300_000, generator=g), torch.randn(3, 300_000, generator=g)]
    module = refactor.factor_low_rank(bs, as_, [1.0, 0.5], 16, 0.99)
    assert module.rank == 5 and "clamped from 16 to 5" in module.note
    rows, cols = torch.arange(0, 200_000, 9973), torch.arange(0, 300_000, 7919)
    sample = sum(c * b[rows] @ a[:, cols] for c, b, a in zip([1.0, 0.5], bs, as_))
    assert torch.allclose(module.b[rows] @ module.a[:, cols], sample, atol=1e-3, rtol=1e-4)


def test_factors_split_singular_values_evenly():
    delta = decaying_spectrum(40, 30, seed=1)
    [module] = refactor.factor_dense(delta[None], 6, 0.99)
    assert torch.allclose(module.b.norm(dim=0), module.a.norm(dim=1), rtol=1e-4)
    s = torch.linalg.svdvals(delta)[:6]
    assert torch.allclose(module.b.norm(dim=0) ** 2, s, rtol=1e-4)


def test_rank_above_min_dimension_is_clamped_with_a_note():
    delta = decaying_spectrum(12, 9, seed=2)
    [module] = refactor.factor_dense(delta[None], 64, 0.99)
    assert module.rank == 9 and module.note == "rank clamped from 64 to 9 (min(out, in))"
    assert measured_error(delta, module) < 1e-5  # full rank reproduces the delta


def test_cat_keeps_every_factor_and_says_so():
    g = torch.Generator().manual_seed(4)
    bs = [torch.randn(10, r, generator=g, dtype=torch.float64) for r in (2, 3)]
    as_ = [torch.randn(r, 7, generator=g, dtype=torch.float64) for r in (2, 3)]
    module = refactor.concatenate(bs, as_, [2.0, -0.5], rank=4)
    assert module.rank == 5 and "exact concatenation (rank 5)" in module.note
    assert torch.allclose(module.b @ module.a, 2.0 * bs[0] @ as_[0] - 0.5 * bs[1] @ as_[1])
    assert refactor.concatenate(bs, as_, [2.0, -0.5], rank=5).note == ""


def test_all_zero_delta_gives_a_zero_adapter():
    [module] = refactor.factor_dense(torch.zeros(1, 8, 6), 4, 0.99)
    assert module.relative_error == 0 and not module.b.any() and not module.a.any()
    zero_b = [torch.zeros(8, 2)]
    low = refactor.factor_low_rank(zero_b, [torch.randn(2, 6)], [1.0], 4, 0.99)
    assert low.relative_error == 0 and not (low.b @ low.a).any()


def test_reference_trim_agrees_with_dense_magnitude_prune_of_one_adapter():
    tau = torch.randn(9, 11, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    got = merge_dense([tau], MergeParams(method="magnitude_prune", weights=(1.0,), density=0.3), key="x")
    assert torch.equal(got, reference.trim(tau, 0.3))


def test_randomized_path_on_a_rank_deficient_delta_is_exact():
    # Rank 3 < sketch width: the Cholesky QR fast path breaks down and the Householder fallback must
    # take over; the stored factors then reproduce the delta.
    g = torch.Generator().manual_seed(6)
    delta = torch.randn(90, 3, generator=g) @ torch.randn(3, 70, generator=g)
    [module] = refactor.factor_dense(delta[None], 8, 0.99, exact=False)
    assert measured_error(delta, module) < 1e-5
    assert module.relative_error < 1e-5


def test_cholesky_qr_gives_orthonormal_columns_of_the_same_span():
    y = torch.randn(3, 500, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q = refactor._cholesky_qr(y)
    assert torch.allclose(q.mT @ q, torch.eye(12, dtype=torch.float64).expand(3, 12, 12), atol=1e-12)
    assert torch.allclose(q @ (q.mT @ y), y, atol=1e-10)  # y lies in the span of q


def test_a_zero_delta_in_a_batch_takes_the_householder_fallback_without_harm(monkeypatch):
    fallbacks = []
    householder = refactor._householder_q
    monkeypatch.setattr(refactor, "_householder_q", lambda y: fallbacks.append(1) or householder(y))
    deltas = torch.stack([decaying_spectrum(80, 60, seed=7), torch.zeros(80, 60)])
    first, zero = refactor.factor_dense(deltas, 5, 0.99, exact=False)
    assert fallbacks  # Cholesky QR of the zero module's sketch fails: the batch is redone
    assert measured_error(deltas[0], first) <= 1.02 * optimal_error(deltas[0], 5)
    assert zero.relative_error == 0 and not zero.b.any()
