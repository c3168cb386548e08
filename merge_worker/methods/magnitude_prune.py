"""magnitude_prune: trim each tau_i to its `density` largest-magnitude entries, then merge linearly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from merge_worker.methods.base import MergeMethod
from merge_worker.methods.sparse_merge import merge_kept
from merge_worker.trim import magnitude_thresholds


class MagnitudePrune(MergeMethod):
    name = "magnitude_prune"
    needs_density = True
    elects_sign: ClassVar[bool] = False  # ties: sign election and disjoint mean instead of a sum

    def combine(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        p = self.params
        thresholds = magnitude_thresholds(taus, p.density)  # per module, per adapter
        return merge_kept(taus, thresholds, p.weights, p.lambda_, ties=self.elects_sign)
