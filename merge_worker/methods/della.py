"""della (Deep et al., 2024, "DELLA-Merging"; mergekit's `della_magprune`): drop entries at random with a
keep probability that grows with magnitude rank, rescale, then TIES sign election.

Per row of a 2-D tau_i (a 1-D tensor is one row), entry j's magnitude rank r_j (1 = smallest of the n
entries of the row) gives p_j = density - epsilon + 2 * epsilon * (r_j - 1) / (n - 1), and the entry is
kept when a uniform draw is below p_j. The draws are DARE's keyed ones (dare_linear.keyed_uniform).
Survivors are rescaled to keep tau_i's L1 norm (mergekit's default), by 1/p_j (the paper's
`inverse-probability`), or not at all. Density +/- epsilon must lie in (0, 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge_worker.methods.dare_linear import keyed_uniform
from merge_worker.methods.sparsified import SparsifiedMerge, keep_all
from merge_worker.spec import DEFAULT_EPSILON


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """The keep probability of each entry of `tau` (ranked along its last dimension)."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    ranks = rows.abs().argsort(dim=-1).argsort(dim=-1).to(torch.float32)  # 0 = smallest
    rank_norm = ranks / max(rows.shape[-1] - 1, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(tau.shape)  # mergekit's float32 order


class Della(SparsifiedMerge):
    name = "della"
    elects_sign = True
    default_normalize = (True, True)
    default_rescale = ("l1", "l1")
    rescales = frozenset({"inverse-probability", "l1", "none"})

    def __init__(self, params, n_adapters: int) -> None:
        super().__init__(params, n_adapters)
        self.epsilons = self.per_adapter("epsilon", DEFAULT_EPSILON)
        for d, e in zip(self.densities, self.epsilons):
            if d < 1 and not (0 < d - e and d + e < 1):
                raise ValueError(f"{self.name}: density +/- epsilon must lie in (0, 1), got {d} and {e}")

    def sparsify_(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        for index, (per_adapter, density, epsilon) in enumerate(zip(taus, self.densities, self.epsilons)):
            if density >= 1:
                continue
            for key, tau in zip(keys, per_adapter):
                probabilities = della_probabilities(tau, density, epsilon).to(tau.dtype)
                kept = keyed_uniform(self.params.seed, key, index, tau) < probabilities
                tau.masked_fill_(kept.logical_not_(), 0)
                if self.rescale == "inverse-probability":
                    tau.div_(probabilities)
        return keep_all(taus)
