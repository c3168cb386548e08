"""merge_modules: lazy, bounded consumption; batching does not change results; clear errors."""

from __future__ import annotations

import pytest
import torch

from merge_worker.factors import LoraFactors, MergeParams
from merge_worker.merge_engine import merge_dense, merge_modules
from merging.conftest import random_adapters

CPU = torch.device("cpu")


def counting(modules, consumed: list):
    for item in modules:
        consumed.append(item[0])
        yield item


def one_shape_modules(n_modules: int, n_adapters: int = 2, shape=(30, 20)):
    g = torch.Generator().manual_seed(0)
    for m in range(n_modules):
        yield f"layers.{m}.q", [LoraFactors(a=torch.randn(3, shape[1], generator=g),
                                            b=torch.randn(shape[0], 3, generator=g), scale=0.5)
                                for _ in range(n_adapters)]


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_modules_are_consumed_lazily_in_bounded_batches(method):
    consumed: list[str] = []
    params = MergeParams(method=method, weights=(1.0, 1.0), density=0.5)
    per_module_bytes = 2 * 30 * 20 * 4
    merged = merge_modules(counting(one_shape_modules(120), consumed), params, rank=4, energy=0.99,
                           device=CPU, batch_bytes=3 * per_module_bytes)
    for produced, (name, _) in enumerate(merged, start=1):
        assert len(consumed) - produced <= 3  # never more than one batch read ahead
    assert produced == 120 and len(consumed) == 120


def test_batching_does_not_change_the_result():
    modules = random_adapters(seed=77)
    params = MergeParams(method="ties", weights=(0.4, 0.9, 0.6), density=0.5)
    batched = dict(merge_modules(iter(modules.items()), params, rank=3, energy=0.99, device=CPU,
                                 dtype=torch.float64))
    one_by_one = dict(merge_modules(iter(modules.items()), params, rank=3, energy=0.99, device=CPU,
                                    dtype=torch.float64, batch_bytes=1))
    assert batched.keys() == one_by_one.keys() == modules.keys()
    for name in modules:
        x, y = batched[name], one_by_one[name]
        assert torch.allclose(x.b @ x.a, y.b @ y.a, rtol=0, atol=1e-12), name


def test_results_come_back_on_the_cpu_as_contiguous_tensors():
    params = MergeParams(method="dare_ties", weights=(1.0, 1.0), density=0.7)
    for _, module in merge_modules(one_shape_modules(3), params, rank=4, energy=0.99, device=CPU):
        assert module.b.device.type == "cpu" and module.b.is_contiguous() and module.a.is_contiguous()
        assert module.b.dtype == torch.float32 and module.rank == 4


def test_rank_auto_through_the_engine_gives_per_module_ranks():
    params = MergeParams(method="linear", weights=(1.0, 1.0, 1.0))
    merged = dict(merge_modules(iter(random_adapters(seed=3).items()), params, rank="auto", energy=0.9,
                                device=CPU, dtype=torch.float64))
    for name, module in merged.items():
        assert 1 <= module.rank and module.relative_error ** 2 <= 0.1 + 1e-12, name


def factors(out_f, in_f, r=2):
    return LoraFactors(a=torch.randn(r, in_f), b=torch.randn(out_f, r), scale=1.0)


@pytest.mark.parametrize(
    ("modules", "params", "message"),
    [
        ([("m", [factors(4, 5), factors(5, 4)])], MergeParams("linear", (1.0, 1.0)), "different shapes"),
        ([("m", [None, None])], MergeParams("linear", (1.0, 1.0)), "no adapter targets"),
        ([("m", [factors(4, 5)] * 3)], MergeParams("slerp", (1.0,) * 3), "exactly two adapters"),
        ([("m", [factors(4, 5)] * 2)], MergeParams("ties", (1.0, 1.0)), "density must be in"),
        ([("m", [factors(4, 5)] * 2)], MergeParams("ties", (1.0, 1.0), density=1.5), "density must be in"),
        ([("m", [factors(4, 5)] * 2)], MergeParams("linear", (1.0,)), "1 weights for 2 adapters"),
        ([("m", [factors(4, 5)] * 2)], MergeParams("mystery", (1.0, 1.0)), "unknown merge method"),
    ],
)
def test_bad_inputs_raise_clear_errors(modules, params, message):
    with pytest.raises(ValueError, match=message):
        list(merge_modules(modules, params, rank=4, energy=0.99, device=CPU))


def test_merge_dense_rejects_mismatched_or_missing_tensors():
    params = MergeParams("linear", (1.0, 1.0))
    with pytest.raises(ValueError, match="lm_head.weight: adapters give different shapes"):
        merge_dense([torch.zeros(3, 4), torch.zeros(4, 3)], params, key="lm_head.weight")
    with pytest.raises(ValueError, match="no adapter provides"):
        merge_dense([None, None], params, key="lm_head.weight")
