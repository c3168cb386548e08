"""ties (Yadav et al., 2023): trim each tau_i, weight, elect a sign per entry, disjoint mean."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge_worker.methods.magnitude_prune import MagnitudePrune


def elect_and_disjoint_mean(
    taus: torch.Tensor, weights: Sequence[float], lambda_: float
) -> torch.Tensor:
    """Steps 2-4 of TIES on (adapters, ...) task vectors, overwriting `taus`.

    u_i = w_i * t_i; gamma = sign(sum_i u_i); keep u_i where it is non-zero with sign gamma;
    delta = lambda * sum(kept u_i) / sum(w_i of kept i), and 0 where nothing is kept."""
    u = taus
    for ui, wi in zip(u, weights):
        ui.mul_(wi)
    gamma = u.sum(0).sign_()
    kept_sum = torch.zeros_like(gamma)
    kept_weight = torch.zeros_like(gamma)
    for ui, wi in zip(u, weights):
        kept = (ui * gamma) > 0  # non-zero and of the elected sign
        kept_sum.add_(ui * kept)
        kept_weight.add_(kept, alpha=wi)
    # Dividing by +inf where no weight was kept gives the required 0 (kept_sum is 0 there too).
    kept_weight.masked_fill_(kept_weight == 0, float("inf"))
    return kept_sum.div_(kept_weight).mul_(lambda_)


class Ties(MagnitudePrune):
    """magnitude_prune's trim, then sign election and disjoint mean instead of a plain sum."""

    name = "ties"

    def merge_sparse(self, taus: torch.Tensor) -> torch.Tensor:
        return elect_and_disjoint_mean(taus, self.params.weights, self.params.lambda_)
