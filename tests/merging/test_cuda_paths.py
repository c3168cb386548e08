"""The CUDA fast paths on a real GPU: jitted Triton kernels, pinned staging, Cholesky-QR sketches.

CI has no GPU, so these skip there; CI checks the same kernels through Triton's interpreter
(test_fused_kernel.py, test_fused_selection.py). On a GPU machine:
`pytest tests/merging/test_cuda_paths.py` (docs/merging.md, "Speed", has what they found)."""

from __future__ import annotations

import pytest
import torch

from merge_worker.factors import LoraFactors, MergeParams
from merge_worker.merge_engine import merge_modules
from merge_worker.methods.sparse_merge import merge_kept, merge_kept_torch
from merge_worker.spec import METHODS
from merge_worker.trim import bracketed_kth_largest, keep_count
from merging import reference
from merging.conftest import SHAPES, dense_taus
from merging.test_mergekit_conventions import CASES, case_id, case_inputs, reference_merge
from merging.test_methods_match_reference import expected, inputs_for, relative_difference, run_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_cuda_matches_the_float64_reference(method, adapters):
    modules = inputs_for(method, adapters)
    merged = run_engine(method, modules, rank=1000, dtype=torch.float32, device=CUDA)
    assert sorted(merged) == sorted(modules)
    for name, factors in modules.items():
        got = merged[name].b.double() @ merged[name].a.double()
        assert relative_difference(got, expected(method, name, factors, device=CUDA)) < 1e-4, (method, name)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_mergekit_conventions_and_options_on_cuda_match_the_float64_reference(case, adapters):
    modules, params = case_inputs(case, adapters)
    merged = dict(merge_modules(iter(modules.items()), params, rank=1000, energy=0.99, device=CUDA))
    for name, factors in modules.items():
        got = merged[name].b.double() @ merged[name].a.double()
        want = reference_merge(params, dense_taus(factors, SHAPES[name]), name, device=CUDA)
        assert relative_difference(got, want) < 1e-4, (case, name)


def test_selection_on_cuda_equals_a_full_sort():
    g = torch.Generator(device=CUDA).manual_seed(5)
    scales = torch.tensor([1e-3, 1.0, 1e3, 1.0], device=CUDA)[:, None]
    rows = torch.randn(4, 3_000_000, generator=g, device=CUDA) * scales
    rows[1, ::3] = 0  # many zeros
    rows[3] = rows[3].round()  # ties at every threshold
    for density in (0.01, 0.2, 0.5, 0.9):
        k = keep_count(rows.shape[1], density)
        want = rows.abs().sort(dim=1, descending=True).values[:, k - 1]
        assert torch.equal(bracketed_kth_largest(rows, k), want), density


@pytest.mark.parametrize(("ties", "normalize", "mergekit"),
                         [(True, None, False), (False, None, False), (True, False, True), (True, True, True),
                          (False, True, True)])
def test_fused_merge_on_cuda_equals_the_torch_definition(ties, normalize, mergekit):
    g = torch.Generator(device=CUDA).manual_seed(7)
    taus = torch.randn(3, 2, 1000, 777, generator=g, device=CUDA)
    taus[:, :, ::5] = 0
    taus[1, :, ::7] = -taus[0, :, ::7]  # sign sums of exactly 0 where adapter 2 is 0
    taus[2, :, ::7] = 0
    thresholds = torch.rand(3, 2, generator=g, device=CUDA)
    weights = [0.6, -0.3, 1.1]
    options = {"ties": ties, "normalize": normalize, "mergekit": mergekit}
    got = merge_kept(taus.clone(), thresholds, weights, 1.4, **options)
    want = merge_kept_torch(taus.double(), thresholds.double(), weights, 1.4, **options)
    assert relative_difference(got.double(), want) < 1e-6


def test_sketched_refactor_on_cuda_is_near_the_optimal_truncation():
    """Large enough for the randomized path (sketch much thinner than the module), batched."""
    g = torch.Generator().manual_seed(11)
    shape, n_modules, rank = (640, 512), 3, 16
    modules = {f"layers.{m}.q": [LoraFactors(a=torch.randn(8, shape[1], generator=g) / 20,
                                             b=torch.randn(shape[0], 8, generator=g), scale=2.0)
                                 for _ in range(3)] for m in range(n_modules)}
    params = MergeParams(method="ties", weights=(0.5, 0.3, 0.7), density=0.3)
    merged = dict(merge_modules(iter(modules.items()), params, rank=rank, energy=0.99, device=CUDA))
    for name, factors in modules.items():
        want = reference.merge("ties", dense_taus(factors, shape), params.weights, density=params.density)
        s = torch.linalg.svdvals(want)
        optimal = float(s[rank:].norm() / s.norm())
        module = merged[name]
        measured = relative_difference(module.b.double() @ module.a.double(), want)
        assert module.rank == rank
        assert measured <= 1.02 * optimal, name
        assert module.relative_error == pytest.approx(measured, rel=1e-2), name
