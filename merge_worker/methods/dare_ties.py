"""dare_ties: DARE's random drop and 1/density rescale of each tau_i, then TIES steps 2-4."""

from __future__ import annotations

import torch

from merge_worker.methods.dare_linear import DareLinear
from merge_worker.methods.ties import elect_and_disjoint_mean


class DareTies(DareLinear):
    name = "dare_ties"

    def merge_sparse(self, taus: torch.Tensor) -> torch.Tensor:
        return elect_and_disjoint_mean(taus, self.params.weights, self.params.lambda_)
