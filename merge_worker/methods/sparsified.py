"""The task-arithmetic family (mergekit's "generalized task arithmetic"): sparsify each tau_i, optionally
rescale the survivors, then merge them linearly or by TIES sign election.

A subclass says how it sparsifies (`sparsify_`), whether it elects signs, and its defaults for
`normalize` and `rescale`, which may differ between adaptermerge's and mergekit's conventions for the
method names the two share (docs/merging.md has the table).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from merge_worker.factors import MergeParams
from merge_worker.methods.base import MergeMethod
from merge_worker.methods.sparse_merge import merge_kept
from merge_worker.trim import zero_below_

# mergekit leaves a task vector unscaled when its L1 norm before or after sparsifying is below this.
L1_RESCALE_EPS = 1e-7


class SparsifiedMerge(MergeMethod):
    elects_sign: ClassVar[bool] = False
    # (adaptermerge conventions, mergekit conventions)
    default_normalize: ClassVar[tuple[bool, bool]] = (False, False)
    default_rescale: ClassVar[tuple[str, str]] = ("none", "none")
    rescales: ClassVar[frozenset[str]] = frozenset({"l1", "none"})

    def __init__(self, params: MergeParams, n_adapters: int) -> None:
        super().__init__(params, n_adapters)
        mergekit = int(params.mergekit)
        self.normalize = self.default_normalize[mergekit] if params.normalize is None else params.normalize
        self.rescale = self.default_rescale[mergekit] if params.rescale is None else params.rescale
        if self.rescale not in self.rescales:
            raise ValueError(f"{self.name}: rescale must be one of {sorted(self.rescales)}, got {self.rescale!r}")

    @abstractmethod
    def sparsify_(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """Sparsifies (adapters, modules, ...) task vectors, in place or through the returned
        (adapters, modules) thresholds: entries below their threshold count as dropped."""

    def combine(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        before = l1_norms(taus) if self.rescale == "l1" else None
        thresholds = self.sparsify_(taus, keys)
        if before is not None:
            for per_adapter, per_threshold in zip(taus, thresholds):
                for tau, threshold in zip(per_adapter, per_threshold):
                    zero_below_(tau, threshold)
            thresholds = torch.zeros_like(thresholds)
            after = l1_norms(taus)
            usable = (before >= L1_RESCALE_EPS) & (after >= L1_RESCALE_EPS)
            scale = torch.where(usable, before / torch.where(usable, after, 1.0), 1.0)
            taus.mul_(scale.view(*scale.shape, *([1] * (taus.dim() - 2))))
        p = self.params
        return merge_kept(taus, thresholds, p.weights, p.lambda_, ties=self.elects_sign, normalize=self.normalize,
                          mergekit=p.mergekit)


def l1_norms(taus: torch.Tensor) -> torch.Tensor:
    """|tau|_1 of each task vector of (adapters, modules, ...), as (adapters, modules)."""
    return taus.abs().reshape(*taus.shape[:2], -1).sum(-1)


def keep_all(taus: torch.Tensor) -> torch.Tensor:
    """Thresholds that drop nothing (for methods that zero entries in place)."""
    return torch.zeros(taus.shape[:2], dtype=taus.dtype, device=taus.device)
