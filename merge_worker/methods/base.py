"""What every merge method provides (one class per method, mergekit style; see ../../../shared/MERGING.md).

All methods work on task vectors in delta-W space. The engine hands a method the dense task vectors of
a batch of equal-shape modules, stacked as `taus[i, m]` (adapter i, module m; zeros where an adapter
does not target the module), and the method returns the merged deltas. Methods whose result is a sum of
scaled low-rank terms (linear, cat, slerp) also say which coefficient multiplies each adapter's
`B_i @ A_i`, so the engine can factor the result exactly without forming any out x in matrix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from merge_worker.factors import LoraFactors, MergeParams


class MergeMethod(ABC):
    name: ClassVar[str]
    needs_density: ClassVar[bool] = False

    def __init__(self, params: MergeParams, n_adapters: int) -> None:
        if len(params.weights) != n_adapters:
            raise ValueError(f"{self.name}: {len(params.weights)} weights for {n_adapters} adapters")
        if self.needs_density and (params.density is None or not 0 < params.density <= 1):
            raise ValueError(f"{self.name}: density must be in (0, 1], got {params.density}")
        self.params = params
        self.n_adapters = n_adapters

    @abstractmethod
    def combine(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """Merges stacked dense task vectors `taus` (adapters, modules, ...) into (modules, ...).

        `keys[m]` names module m (it keys DARE's randomness). `taus` may be overwritten."""

    def weights_like(self, taus: torch.Tensor) -> torch.Tensor:
        """The adapter weights as a tensor that broadcasts against `taus`."""
        weights = torch.tensor(self.params.weights, dtype=taus.dtype, device=taus.device)
        return weights.view(-1, *([1] * (taus.dim() - 1)))


class LowRankMethod(MergeMethod):
    """A method whose merged delta is sum_i c_i * B_i @ A_i for per-adapter coefficients c_i."""

    # cat stores the factors side by side instead of re-factoring their sum.
    stores_concatenation: ClassVar[bool] = False

    @abstractmethod
    def coefficients(self, factors: Sequence[LoraFactors | None]) -> list[float]:
        """c_i for each adapter (0 where it does not target the module); includes s_i and lambda."""


def weighted_sum(taus: torch.Tensor, weights: Sequence[float], lambda_: float) -> torch.Tensor:
    """lambda * sum_i w_i * taus[i], as one matrix product (no adapter-sized temporaries)."""
    w = torch.tensor([lambda_ * wi for wi in weights], dtype=taus.dtype, device=taus.device)
    return torch.tensordot(w, taus, dims=1)
