"""sce (Wan et al., 2024, "FuseChat"; mergekit's): select, calculate, erase, on each module.

1. select: with select_topk < 1, keep the entries whose variance across the task vectors is among the
   int(select_topk * v) largest (round under adaptermerge conventions), v = entries of non-zero variance;
2. calculate: w_i = mean(tau_i^2) / sum_j mean(tau_j^2) (1/N when that sum is below 1e-6);
3. erase: TIES' sign election on the unweighted sum (mergekit elects + on a sum of 0);
delta = lambda * sum_i (kept w_i tau_i) / max(sum_i kept w_i, 1e-6). Spec weights are not used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merge_worker.methods.base import MergeMethod
from merge_worker.trim import kth_largest_magnitude


class Sce(MergeMethod):
    name = "sce"

    def combine(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        out = torch.empty_like(taus[0])
        for m in range(taus.shape[1]):
            out[m] = self._merge_module(taus[:, m])
        return out.mul_(self.params.lambda_)

    def _merge_module(self, tvs: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.select_topk < 1:
            variance = tvs.var(dim=0, unbiased=False)
            nonzero = int(torch.count_nonzero(variance))
            k = int(nonzero * p.select_topk) if p.mergekit else round(nonzero * p.select_topk)
            tvs = tvs * (variance >= kth_largest_magnitude(variance, k))  # k = 0: +inf keeps nothing
        total = tvs.sum(0)
        elected = torch.where(total >= 0, 1.0, -1.0).to(tvs.dtype) if p.mergekit else total.sign()
        kept = (tvs * elected) > 0  # non-zero and of the elected sign
        energy = tvs.square().reshape(tvs.shape[0], -1).mean(1)
        energy_sum = float(energy.sum())
        weights = torch.full_like(energy, 1 / len(energy)) if abs(energy_sum) < 1e-6 else energy / energy_sum
        weights = weights.view(-1, *([1] * (tvs.dim() - 1))) * kept
        return (tvs * weights).sum(0) / weights.sum(0).clamp(min=1e-6)
