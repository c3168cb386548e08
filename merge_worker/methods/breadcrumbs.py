"""breadcrumbs (Davari & Belilovsky, 2023; mergekit's `magnitude_outliers`): drop the `gamma` fraction of
largest-magnitude entries of each tau_i and then the smallest, keeping a `density` fraction, and merge
linearly.

With n entries, k = int(density * n) (round under adaptermerge conventions) entries are kept, ranked
just below the top min(int(gamma * n), n - k). Entries tied at a bound are kept or dropped together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge_worker.methods.sparsified import SparsifiedMerge, keep_all
from merge_worker.spec import DEFAULT_GAMMA
from merge_worker.trim import count_thresholds


class Breadcrumbs(SparsifiedMerge):
    name = "breadcrumbs"

    def sparsify_(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        if all(d >= 1 for d in self.densities):
            return keep_all(taus)
        n = taus[0, 0].numel()
        count = (lambda x: int(x * n)) if self.params.mergekit else (lambda x: round(x * n))
        gammas = self.per_adapter("gamma", DEFAULT_GAMMA)
        kept = [n if d >= 1 else count(d) for d in self.densities]
        top = [0 if d >= 1 else min(count(g), n - k) for d, g, k in zip(self.densities, gammas, kept)]
        # Both bounds come from the task vectors as they are; then |tau| >= the top-th largest is zeroed
        # here, and |tau| below the (top + kept)-th largest by the returned thresholds.
        upper = count_thresholds(taus, top)  # +inf where top is 0
        lower = count_thresholds(taus, [t + k for t, k in zip(top, kept)])
        for i, k in enumerate(kept):
            if k == 0:
                lower[i] = float("inf")
        for per_adapter, per_upper in zip(taus, upper):
            for tau, bound in zip(per_adapter, per_upper):
                tau.masked_fill_(tau.abs() >= bound, 0)
        return lower
