"""Every method, run through the engine in float64 at full rank, equals the float64 reference."""

from __future__ import annotations

import pytest
import torch

from merge_worker.factors import MergeParams
from merge_worker.merge_engine import merge_dense, merge_modules
from merge_worker.spec import METHODS
from merging import reference
from merging.conftest import SHAPES, dense_taus

WEIGHTS = (0.5, 0.3, 0.7)  # deliberately not summing to 1
DENSITY, LAMBDA, T, SEED = 0.4, 1.3, 0.3, 7


def params_for(method: str, n: int) -> MergeParams:
    return MergeParams(method=method, weights=WEIGHTS[:n], density=DENSITY, lambda_=LAMBDA, t=T, seed=SEED)


def expected(method: str, name: str, factors: list, device=torch.device("cpu")) -> torch.Tensor:
    """The reference merge; `device` is the merge device, where DARE draws its masks (docs/merging.md)."""
    taus = dense_taus(factors, SHAPES[name])
    return reference.merge(method, taus, WEIGHTS[: len(taus)], density=DENSITY, lam=LAMBDA, t=T,
                           seed=SEED, key=name, device=device)


def relative_difference(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm().clamp_min(1e-300))


def inputs_for(method: str, adapters: dict) -> dict:
    # slerp takes exactly two adapters; the second one skips some modules (the fallback path).
    return {k: v[:2] for k, v in adapters.items()} if method in ("slerp", "nuslerp") else adapters


def run_engine(method: str, modules: dict, rank, dtype=torch.float64, device=torch.device("cpu")) -> dict:
    params = params_for(method, len(next(iter(modules.values()))))
    if dtype != torch.float64:
        modules = {k: [None if f is None else type(f)(a=f.a.to(dtype), b=f.b.to(dtype), scale=f.scale)
                       for f in v] for k, v in modules.items()}
    return dict(merge_modules(iter(modules.items()), params, rank=rank, energy=0.99, device=device,
                              dtype=dtype))


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_merge_equals_reference(method, adapters):
    modules = inputs_for(method, adapters)
    merged = run_engine(method, modules, rank=1000)
    assert sorted(merged) == sorted(modules)
    for name, factors in modules.items():
        want = expected(method, name, factors)
        got = merged[name].b @ merged[name].a
        assert want.norm() > 0
        assert relative_difference(got, want) < 1e-10, name
        assert merged[name].relative_error < 1e-7


@pytest.mark.parametrize("method", METHODS)
def test_float32_default_path_is_close_to_reference(method, adapters):
    modules = inputs_for(method, adapters)
    merged = run_engine(method, modules, rank=1000, dtype=torch.float32)
    for name, factors in modules.items():
        got = merged[name].b @ merged[name].a
        assert got.dtype == torch.float32
        assert relative_difference(got.double(), expected(method, name, factors)) < 1e-4, name


@pytest.mark.parametrize("method", METHODS)
def test_truncated_rank_is_the_optimal_truncation_of_the_reference(method, adapters):
    modules = inputs_for(method, adapters)
    merged = run_engine(method, modules, rank=2)
    for name, factors in modules.items():
        want = expected(method, name, factors)
        s = torch.linalg.svdvals(want)
        optimal = float(s[2:].norm() / s.norm())
        module = merged[name]
        measured = relative_difference(module.b @ module.a, want)
        if method == "cat":  # cat never truncates: it stores every input factor exactly
            assert measured < 1e-10 and module.relative_error == 0.0
            continue
        assert module.rank == 2
        assert measured == pytest.approx(optimal, rel=1e-7, abs=1e-12), name
        assert module.relative_error == pytest.approx(measured, rel=1e-6, abs=1e-12), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(7, 5), (33,)])
def test_merge_dense_equals_reference(method, shape):
    generator = torch.Generator().manual_seed(99)
    n = 2 if method in ("slerp", "nuslerp") else 3
    taus = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(n)]
    taus_with_gap = taus[:-1] + [None]  # the last adapter lacks this tensor: a zero task vector
    params = params_for(method, n)
    got = merge_dense(taus_with_gap, params, key="lm_head.weight")
    dense = taus[:-1] + [torch.zeros(shape, dtype=torch.float64)]
    want = reference.merge(method, dense, WEIGHTS[:n], density=DENSITY, lam=LAMBDA, t=T, seed=SEED,
                           key="lm_head.weight")
    assert got.shape == torch.Size(shape)
    assert relative_difference(got, want) < 1e-12
