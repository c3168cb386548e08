"""magnitude_prune: trim each tau_i to its `density` largest-magnitude entries, then merge linearly."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge_worker.methods.base import MergeMethod, weighted_sum
from merge_worker.trim import trim_


def trim_each_(taus: torch.Tensor, density: float) -> torch.Tensor:
    """Trims every task vector taus[i, m] on its own (per module, per adapter), in place."""
    for per_adapter in taus:
        for tau in per_adapter:
            trim_(tau, density)
    return taus


class MagnitudePrune(MergeMethod):
    name = "magnitude_prune"
    needs_density = True

    def combine(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        return self.merge_sparse(trim_each_(taus, self.params.density))

    def merge_sparse(self, taus: torch.Tensor) -> torch.Tensor:
        """Combines the trimmed task vectors (ties overrides this)."""
        return weighted_sum(taus, self.params.weights, self.params.lambda_)
