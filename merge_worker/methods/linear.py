"""linear (task arithmetic): delta = lambda * sum_i w_i * tau_i."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge_worker.factors import LoraFactors
from merge_worker.methods.base import LowRankMethod, weighted_sum


class Linear(LowRankMethod):
    name = "linear"

    def coefficients(self, factors: Sequence[LoraFactors | None]) -> list[float]:
        p = self.params
        return [0.0 if f is None else p.lambda_ * w * f.scale for f, w in zip(factors, p.weights)]

    def combine(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        return weighted_sum(taus, self.params.weights, self.params.lambda_)
