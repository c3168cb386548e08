"""Small random adapters for the merge tests: mixed ranks, alphas, rslora, rank patterns and target sets."""

from __future__ import annotations

import pytest
import torch

from merge_worker.factors import LoraFactors
from merging import reference

# module name -> (out_features, in_features)
SHAPES = {
    "layers.0.q": (12, 16),
    "layers.0.up": (20, 16),
    "layers.0.down": (16, 20),
    "layers.1.q": (12, 16),
    "layers.1.up": (20, 16),
    "layers.1.down": (16, 20),
}
# r, alpha, use_rslora, per-module rank overrides (rank_pattern), targeted modules
ADAPTERS = [
    (4, 8.0, False, {"layers.0.up": 2}, set(SHAPES)),
    (3, 16.0, True, {}, {"layers.0.q", "layers.0.up", "layers.1.q", "layers.1.down"}),
    (6, 3.0, False, {"layers.1.up": 1}, {"layers.0.down", "layers.1.q", "layers.1.up"}),
]


def random_adapters(seed: int, adapters=ADAPTERS, dtype=torch.float64) -> dict[str, list]:
    """module name -> one LoraFactors (or None where the adapter skips the module) per adapter."""
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, list] = {name: [] for name in SHAPES}
    for r, alpha, rslora, pattern, targets in adapters:
        for name, (out_f, in_f) in SHAPES.items():
            if name not in targets:
                modules[name].append(None)
                continue
            rank = pattern.get(name, r)
            a = torch.randn(rank, in_f, generator=generator, dtype=dtype)
            b = torch.randn(out_f, rank, generator=generator, dtype=dtype)
            modules[name].append(LoraFactors(a=a, b=b, scale=reference.lora_scale(alpha, rank, rslora)))
    return modules


def dense_taus(factors: list, shape) -> list[torch.Tensor]:
    """The float64 task vectors s_i * B_i @ A_i, zeros for adapters that skip the module."""
    return [
        torch.zeros(shape, dtype=torch.float64) if f is None
        else f.scale * (f.b.double() @ f.a.double())
        for f in factors
    ]


@pytest.fixture
def adapters() -> dict[str, list]:
    return random_adapters(seed=1234)
