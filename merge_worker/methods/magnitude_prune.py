"""magnitude_prune: trim each tau_i to its `density` largest-magnitude entries, then merge linearly.

Keeps round(density * n) entries (adaptermerge conventions) or mergekit's max(1, int(density * n)); the
same as mergekit's breadcrumbs with gamma 0 apart from that rounding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge_worker.methods.sparsified import SparsifiedMerge, keep_all
from merge_worker.trim import count_thresholds, keep_count


class MagnitudePrune(SparsifiedMerge):
    name = "magnitude_prune"
    needs_density = True

    def keep_counts(self, numel: int) -> list[int]:
        if self.params.mergekit:
            return [numel if d >= 1 else max(1, int(d * numel)) for d in self.densities]
        return [keep_count(numel, d) for d in self.densities]

    def sparsify_(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        if all(d >= 1 for d in self.densities):
            return keep_all(taus)
        counts = self.keep_counts(taus[0, 0].numel())
        thresholds = count_thresholds(taus, counts)  # per module, per adapter
        for i, d in enumerate(self.densities):
            if d >= 1:
                thresholds[i] = 0
        return thresholds
