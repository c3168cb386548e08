"""The values passed between reading adapters, merging, and writing the result.

One target module of one adapter is a `LoraFactors`: its task vector is `scale * b @ a`. Readers produce
them, the merge methods consume them, and a merge yields a `MergedModule` whose factors reproduce the
merged delta with scale 1 (so the written adapter uses lora_alpha == r for every module).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraFactors:
    a: torch.Tensor  # (r, in_features): lora_A.weight as stored
    b: torch.Tensor  # (out_features, r): lora_B.weight as stored
    scale: float  # alpha / r, or alpha / sqrt(r) with rslora; rank_pattern/alpha_pattern applied

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the module's delta-W."""
        return (self.b.shape[0], self.a.shape[1])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The task vector tau = scale * B @ A as a dense (out, in) matrix."""
        return self.scale * (self.b.to(dtype) @ self.a.to(dtype))


@dataclass(frozen=True)
class MergeParams:
    method: str  # one of merge_worker.spec.METHODS
    weights: tuple[float, ...]  # one per adapter, in spec order
    density: float | None = None
    lambda_: float = 1.0
    t: float = 0.5
    seed: int = 0
    # Per-adapter overrides of density/gamma/epsilon (None entries fall back to the global value).
    densities: tuple[float | None, ...] | None = None
    gammas: tuple[float | None, ...] | None = None
    epsilons: tuple[float | None, ...] | None = None
    gamma: float | None = None  # breadcrumbs; None: mergekit's 0.01
    epsilon: float | None = None  # della; None: mergekit's 0.15
    normalize: bool | None = None  # None: the method's default under `conventions`
    rescale: str | None = None  # "l1" | "inverse-probability" | "none"; None: the method's default
    conventions: str = "adaptermerge"  # or "mergekit": int(density * n) kept, + elected on a zero sign sum
    select_topk: float = 1.0  # sce

    @property
    def mergekit(self) -> bool:
        return self.conventions == "mergekit"


@dataclass(frozen=True)
class MergedModule:
    b: torch.Tensor  # (out_features, rank)
    a: torch.Tensor  # (rank, in_features); b @ a approximates the merged delta (scale 1)
    relative_error: float  # ||delta - b @ a||_F / ||delta||_F (0 for an all-zero delta)
    note: str = ""  # e.g. "rank clamped from 64 to 24", "cat stores the exact concatenation"

    @property
    def rank(self) -> int:
        return self.a.shape[0]
