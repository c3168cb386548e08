"""mergekit's methods, options and conventions (docs/merging.md) through the engine equal the float64
reference, and the two conventions differ exactly where the docs say they do."""

from __future__ import annotations

import pytest
import torch

from merge_worker.factors import MergeParams
from merge_worker.merge_engine import merge_dense, merge_modules
from merging import reference
from merging.conftest import SHAPES, dense_taus

WEIGHTS = (0.5, 0.3, 0.7)
MK = {"conventions": "mergekit"}

# (method, MergeParams fields besides method/weights); density 0.4 unless given.
CASES = [
    ("linear", MK),
    ("linear", {"normalize": True}),
    ("task_arithmetic", {"normalize": True, **MK}),
    ("magnitude_prune", MK),
    ("ties", MK),
    ("ties", {"normalize": False, **MK}),
    ("ties", {"rescale": "l1", **MK}),
    ("ties", {"densities": (0.3, None, 1.0)}),
    ("dare_linear", MK),
    ("dare_linear", {"rescale": "none"}),
    ("dare_ties", MK),
    ("dare_ties", {"densities": (0.2, 0.9, None), **MK}),
    ("breadcrumbs", {"gamma": 0.05}),
    ("breadcrumbs", {"gamma": 0.1, "densities": (0.5, None, 0.95), **MK}),
    ("breadcrumbs", {"gamma": 0.3, "density": 0.9, **MK}),  # gamma cut shrinks to keep the density
    ("breadcrumbs_ties", MK),
    ("breadcrumbs_ties", {"gammas": (0.0, 0.2, None), "normalize": True}),
    ("della", MK),
    ("della", {"epsilon": 0.1, "rescale": "inverse-probability"}),
    ("della", {"epsilons": (0.05, None, 0.3), "density": 0.5, **MK}),
    ("della_linear", {"rescale": "none", **MK}),
    ("nuslerp", {"lambda_": 1.2}),
    ("model_stock", MK),
    ("sce", {"select_topk": 0.5, **MK}),
    ("sce", {"select_topk": 0.3}),
]


def params_for(method: str, options: dict, n: int) -> MergeParams:
    fields = {"density": 0.4, "seed": 3, **options}
    return MergeParams(method=method, weights=WEIGHTS[:n], **fields)


def reference_merge(params: MergeParams, taus: list, key: str, device=torch.device("cpu")) -> torch.Tensor:
    """The reference merge; `device` is the merge device, where DARE and DELLA draw (docs/merging.md)."""
    return reference.merge(
        params.method, taus, params.weights, density=params.density, lam=params.lambda_, seed=params.seed,
        key=key, device=device, densities=params.densities, gamma=params.gamma, gammas=params.gammas, epsilon=params.epsilon,
        epsilons=params.epsilons, normalize=params.normalize, rescale=params.rescale,
        conventions=params.conventions, select_topk=params.select_topk,
    )


def case_id(case) -> str:
    return case[0] + "-" + "-".join(f"{k}={v}" for k, v in case[1].items())


def case_inputs(case, adapters) -> tuple[dict, MergeParams]:
    method, options = case
    modules = {k: v[:2] for k, v in adapters.items()} if method == "nuslerp" else adapters
    n = len(next(iter(modules.values())))
    options = {k: v[:n] if isinstance(v, tuple) else v for k, v in options.items()}
    return modules, params_for(method, options, n)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_engine_equals_reference(case, adapters):
    modules, params = case_inputs(case, adapters)
    merged = dict(merge_modules(iter(modules.items()), params, rank=1000, energy=0.99,
                                device=torch.device("cpu"), dtype=torch.float64))
    for name, factors in modules.items():
        want = reference_merge(params, dense_taus(factors, SHAPES[name]), name)
        got = merged[name].b @ merged[name].a
        assert want.norm() > 0, name
        assert float((got - want).norm() / want.norm()) < 1e-10, name
        dense = merge_dense([None if f is None else f.delta(torch.float64) for f in factors], params, key=name)
        assert float((dense - want).norm() / want.norm()) < 1e-10, name


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_a_zero_sign_sum_elects_plus_only_under_mergekit(method):
    a = torch.randn(6, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    taus = [a, -a]  # every entry's sign sum is exactly 0
    ours = merge_dense(taus, MergeParams(method, (1.0, 1.0), density=1.0), key="m")
    theirs = merge_dense(taus, MergeParams(method, (1.0, 1.0), density=1.0, conventions="mergekit"), key="m")
    assert not ours.any()
    # + wins: each entry keeps the one task vector that is positive there (weight 1: as it is).
    assert torch.equal(theirs, a.abs())


def test_density_rounding_follows_the_conventions():
    x = torch.arange(1.0, 11.0, dtype=torch.float64).view(1, 10)  # 10 distinct magnitudes
    taus = [x]
    ours = merge_dense(taus, MergeParams("magnitude_prune", (1.0,), density=0.38), key="m")
    theirs = merge_dense(taus, MergeParams("magnitude_prune", (1.0,), density=0.38, conventions="mergekit"), key="m")
    assert int(ours.count_nonzero()) == round(0.38 * 10) == 4
    assert int(theirs.count_nonzero()) == int(0.38 * 10) == 3
    tiny = merge_dense(taus, MergeParams("magnitude_prune", (1.0,), density=0.05, conventions="mergekit"), key="m")
    assert int(tiny.count_nonzero()) == 1  # mergekit keeps at least one entry


def test_breadcrumbs_drops_the_largest_entries():
    x = torch.arange(1.0, 101.0, dtype=torch.float64).view(10, 10)
    got = merge_dense([x], MergeParams("breadcrumbs", (1.0,), density=0.5, gamma=0.1), key="m")
    kept = sorted(int(v) for v in got.flatten() if v)
    assert kept == list(range(41, 91))  # the 10 largest go, then the 40 smallest


def test_l1_rescale_keeps_each_task_vector_l1_norm():
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for method in ("dare_linear", "della_linear"):
        got = merge_dense([x], MergeParams(method, (1.0,), density=0.5, rescale="l1"), key="m")
        assert got.count_nonzero() < x.numel()
        assert float(got.abs().sum()) == pytest.approx(float(x.abs().sum()), rel=1e-12)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (MergeParams("della", (1.0,), density=0.9), "density \\+/- epsilon"),
        (MergeParams("ties", (1.0,), density=0.5, rescale="inverse-probability"), "rescale must be one of"),
        (MergeParams("nuslerp", (1.0,) * 3), "exactly two adapters"),
        (MergeParams("model_stock", (1.0,)), "two adapters or more"),
        (MergeParams("ties", (1.0, 1.0), densities=(0.5,)), "1 values of density for 2 adapters"),
    ],
)
def test_bad_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message):
        merge_dense([torch.ones(3, 3)] * len(params.weights), params, key="m")
