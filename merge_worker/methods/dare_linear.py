"""dare_linear (Yu et al., 2023): drop entries at random with p = 1 - density, rescale by 1/density, merge
linearly.

The randomness of adapter i on module `key` comes from its own generator, seeded with
`dare_generator_seed(seed, key, i)`, and the kept entries are `torch.rand(shape, dtype=float32) <
density` on the merge device. So the result depends only on (seed, module name, adapter index, device),
never on module order or batching, and the same seed gives the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import ClassVar

import torch

from merge_worker.methods.base import MergeMethod
from merge_worker.methods.sparse_merge import merge_kept


def dare_generator_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit generator seed for adapter `index` on module `key` (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}/{key}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def drop_and_rescale_(
    taus: torch.Tensor, density: float, seed: int, keys: Sequence[str]
) -> torch.Tensor:
    """DARE on (adapters, modules, ...) task vectors, in place."""
    if density >= 1:
        return taus  # nothing is dropped and 1/density is 1
    for index, per_adapter in enumerate(taus):
        for key, tau in zip(keys, per_adapter):
            generator = torch.Generator(device=tau.device)
            generator.manual_seed(dare_generator_seed(seed, key, index))
            kept = torch.rand(tau.shape, generator=generator, dtype=torch.float32, device=tau.device) < density
            tau.masked_fill_(kept.logical_not_(), 0).div_(density)
    return taus


class DareLinear(MergeMethod):
    name = "dare_linear"
    needs_density = True
    elects_sign: ClassVar[bool] = False  # dare_ties: sign election and disjoint mean instead of a sum

    def combine(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        p = self.params
        drop_and_rescale_(taus, p.density, p.seed, keys)
        keep_all = torch.zeros(taus.shape[:2], dtype=taus.dtype, device=taus.device)
        return merge_kept(taus, keep_all, p.weights, p.lambda_, ties=self.elects_sign)
