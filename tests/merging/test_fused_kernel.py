"""The fused Triton kernel of the sparse merge (the GPU fast path) equals the float64 definitions.

Runs the kernel through Triton's interpreter on the CPU, so CI without a GPU checks the same code."""

from __future__ import annotations

import pytest
import torch

from merge_worker.methods import sparse_merge
from merge_worker.trim import magnitude_thresholds
from merging import reference

interpreter = pytest.importorskip("triton.runtime.interpreter")


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize(("n_adapters", "n_modules", "numel"), [(4, 1, 3000), (3, 2, 1030), (1, 2, 7)])
def test_fused_kernel_equals_reference(ties, n_adapters, n_modules, numel):
    g = torch.Generator().manual_seed(n_adapters * 100 + numel)
    taus = torch.randn(n_adapters, n_modules, numel, generator=g)
    taus[:, :, ::7] = 0  # zeros are never kept, whatever the threshold
    density = 0.4
    weights = [0.7, -0.2, 0.0, 1.3][:n_adapters]  # negative and zero weights too
    thresholds = magnitude_thresholds(taus, density)
    kernel = interpreter.InterpretedFunction(sparse_merge._fused)
    got = sparse_merge.launch_fused(kernel, taus.clone(), thresholds, weights, 1.5, ties=ties)
    method = "ties" if ties else "magnitude_prune"
    for m in range(n_modules):
        want = reference.merge(method, [t.double() for t in taus[:, m]], weights, density=density, lam=1.5)
        assert torch.allclose(got[m].double(), want, rtol=1e-5, atol=1e-6)


def test_threshold_zero_keeps_everything_and_infinity_nothing():
    taus = torch.randn(2, 2, 500, generator=torch.Generator().manual_seed(1))
    thresholds = torch.tensor([[0.0, float("inf")], [0.0, float("inf")]])
    kernel = interpreter.InterpretedFunction(sparse_merge._fused)
    got = sparse_merge.launch_fused(kernel, taus.clone(), thresholds, [0.5, 0.25], 1.0, ties=False)
    assert torch.allclose(got[0], 0.5 * taus[0, 0] + 0.25 * taus[1, 0], atol=1e-6)
    assert not got[1].any()


@pytest.mark.parametrize(("normalize", "mergekit"), [(True, True), (False, True), (False, False)])
def test_fused_kernel_options_equal_reference(normalize, mergekit):
    g = torch.Generator().manual_seed(11)
    taus = torch.randn(3, 2, 1030, generator=g)
    taus[1, :, ::5] = -taus[0, :, ::5]  # sign sums of exactly 0 (adapter 2 is zero there)
    taus[2, :, ::5] = 0
    weights = [1.0, 1.0, 0.4]
    thresholds = torch.zeros(3, 2)
    kernel = interpreter.InterpretedFunction(sparse_merge._fused)
    got = sparse_merge.launch_fused(kernel, taus.clone(), thresholds, weights, 1.5, ties=True, normalize=normalize,
                                    mergekit=mergekit)
    conventions = "mergekit" if mergekit else "adaptermerge"
    for m in range(2):
        us = [w * t.double() for w, t in zip(weights, taus[:, m])]
        want = reference.consensus(us, weights, 1.5, normalize=normalize, conventions=conventions)
        assert torch.allclose(got[m].double(), want, rtol=1e-5, atol=1e-6)
