"""dare_linear (Yu et al., 2023): drop entries at random with p = 1 - density, rescale the survivors,
merge linearly.

Rescaling: by 1/density (`inverse-probability`, DARE's paper, adaptermerge's default) or, mergekit's
default (`rescale: true` there), so that each tau_i keeps its L1 norm (`l1`), or not at all (`none`).

The randomness of adapter i on module `key` comes from its own generator, seeded with
`dare_generator_seed(seed, key, i)`, and the kept entries are `torch.rand(shape, dtype=float32) <
density` on the merge device. So the result depends only on (seed, module name, adapter index, device),
never on module order or batching, and the same seed gives the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from merge_worker.methods.sparsified import SparsifiedMerge, keep_all


def dare_generator_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit generator seed for adapter `index` on module `key` (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}/{key}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keyed_uniform(seed: int, key: str, index: int, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 draws shaped like `like`, on its device, keyed by (seed, key, index)."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(dare_generator_seed(seed, key, index))
    return torch.rand(like.shape, generator=generator, dtype=torch.float32, device=like.device)


def drop_and_rescale_(
    taus: torch.Tensor, density: float | Sequence[float], seed: int, keys: Sequence[str], *,
    inverse: bool = True,
) -> torch.Tensor:
    """DARE on (adapters, modules, ...) task vectors, in place, with one density or one per adapter;
    `inverse` divides the survivors by their density."""
    densities = [density] * len(taus) if isinstance(density, (int, float)) else density
    for index, (per_adapter, density) in enumerate(zip(taus, densities)):
        if density >= 1:
            continue  # nothing is dropped and 1/density is 1
        for key, tau in zip(keys, per_adapter):
            kept = keyed_uniform(seed, key, index, tau) < density
            tau.masked_fill_(kept.logical_not_(), 0)
            if inverse:
                tau.div_(density)
    return taus


class DareLinear(SparsifiedMerge):
    name = "dare_linear"
    needs_density = True
    default_rescale = ("inverse-probability", "l1")
    rescales = frozenset({"inverse-probability", "l1", "none"})

    def sparsify_(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        drop_and_rescale_(taus, self.densities, self.params.seed, keys, inverse=self.rescale == "inverse-probability")
        return keep_all(taus)
