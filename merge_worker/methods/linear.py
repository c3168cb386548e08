"""linear: delta = lambda * sum_i w_i * tau_i, divided by sum_i w_i when normalize is set.

adaptermerge's `linear` does not normalize by default (it is task arithmetic); mergekit's `linear`
averages whole weights, which on full models is the base plus the normalized sum (normalize true, its
default under mergekit conventions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from merge_worker.factors import LoraFactors, MergeParams
from merge_worker.methods.base import LowRankMethod, weighted_sum
from merge_worker.methods.sparse_merge import weight_divisor


class Linear(LowRankMethod):
    name = "linear"
    default_normalize: ClassVar[tuple[bool, bool]] = (False, True)  # (adaptermerge, mergekit conventions)

    def __init__(self, params: MergeParams, n_adapters: int) -> None:
        super().__init__(params, n_adapters)
        normalize = self.default_normalize[int(params.mergekit)] if params.normalize is None else params.normalize
        self.scale = params.lambda_ / (weight_divisor(params.weights) if normalize else 1.0)

    def coefficients(self, factors: Sequence[LoraFactors | None]) -> list[float]:
        return [0.0 if f is None else self.scale * w * f.scale for f, w in zip(factors, self.params.weights)]

    def combine(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        return weighted_sum(taus, self.params.weights, self.scale)
