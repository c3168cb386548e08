"""What every merge method provides (one class per method, mergekit style; docs/merging.md).

All methods work on task vectors in delta-W space. The engine hands a method the dense task vectors of
a batch of equal-shape modules, stacked as `taus[i, m]` (adapter i, module m; zeros where an adapter
does not target the module), and the method returns the merged deltas. Methods whose result is a sum of
scaled low-rank terms (linear, task_arithmetic, cat, slerp, nuslerp, model_stock) also say which coefficient multiplies each adapter's
`B_i @ A_i`, so the engine can factor the result exactly without forming any out x in matrix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from merge_worker.factors import LoraFactors, MergeParams


_PLURAL = {"density": "densities", "gamma": "gammas", "epsilon": "epsilons"}


class MergeMethod(ABC):
    name: ClassVar[str]
    # Under adaptermerge conventions, density has no default for this method (mergekit's default is 1).
    needs_density: ClassVar[bool] = False

    def __init__(self, params: MergeParams, n_adapters: int) -> None:
        if len(params.weights) != n_adapters:
            raise ValueError(f"{self.name}: {len(params.weights)} weights for {n_adapters} adapters")
        self.params = params
        self.n_adapters = n_adapters
        self.densities = self.per_adapter("density", None if self.needs_density and not params.mergekit else 1.0)
        for d in self.densities:
            if d is None or not 0 < d <= 1:
                raise ValueError(f"{self.name}: density must be in (0, 1], got {d}")

    def per_adapter(self, name: str, default: float | None) -> list[float | None]:
        """Parameter `name` for each adapter: its own override, else the global value, else `default`."""
        overrides = getattr(self.params, _PLURAL[name]) or (None,) * self.n_adapters
        if len(overrides) != self.n_adapters:
            raise ValueError(f"{self.name}: {len(overrides)} values of {name} for {self.n_adapters} adapters")
        shared = getattr(self.params, name)
        return [o if o is not None else shared if shared is not None else default for o in overrides]

    @abstractmethod
    def combine(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """Merges stacked dense task vectors `taus` (adapters, modules, ...) into (modules, ...).

        `keys[m]` names module m (it keys DARE's randomness). `taus` may be overwritten."""

    def weights_like(self, taus: torch.Tensor) -> torch.Tensor:
        """The adapter weights as a tensor that broadcasts against `taus`."""
        weights = torch.tensor(self.params.weights, dtype=taus.dtype, device=taus.device)
        return weights.view(-1, *([1] * (taus.dim() - 1)))


class LowRankMethod(MergeMethod):
    """A method whose merged delta is sum_i c_i * B_i @ A_i for per-adapter coefficients c_i."""

    # cat stores the factors side by side instead of re-factoring their sum.
    stores_concatenation: ClassVar[bool] = False

    @abstractmethod
    def coefficients(self, factors: Sequence[LoraFactors | None]) -> list[float]:
        """c_i for each adapter (0 where it does not target the module); includes s_i and lambda."""


def weighted_sum(taus: torch.Tensor, weights: Sequence[float], lambda_: float) -> torch.Tensor:
    """lambda * sum_i w_i * taus[i], as one matrix product (no adapter-sized temporaries)."""
    w = torch.tensor([lambda_ * wi for wi in weights], dtype=taus.dtype, device=taus.device)
    return torch.tensordot(w, taus, dims=1)


def factor_inner(f: LoraFactors | None, g: LoraFactors | None) -> float:
    """<f.scale * f.b @ f.a, g.scale * g.b @ g.a>_F = scales * sum((B_f^T B_g) * (A_f A_g^T)), from r x r
    products only (0 where either adapter skips the module)."""
    if f is None or g is None:
        return 0.0
    return f.scale * g.scale * float(((f.b.T @ g.b) * (f.a @ g.a.T)).sum())


def flat_inner(x: torch.Tensor, y: torch.Tensor) -> float:
    """<x, y> of two dense task vectors, flattened."""
    return float(x.reshape(-1) @ y.reshape(-1))


class GramMethod(LowRankMethod):
    """A low-rank method whose coefficients depend only on the inner products of the task vectors (slerp
    variants, model_stock): with LoRA inputs they come from r x r products, never from out x in ones."""

    @abstractmethod
    def tau_coefficients(self, gram: list[list[float]]) -> list[float]:
        """k_i with merged delta = sum_i k_i tau_i, from gram[i][j] = <tau_i, tau_j> (lambda included)."""

    def coefficients(self, factors: Sequence[LoraFactors | None]) -> list[float]:
        gram = [[factor_inner(f, g) for g in factors] for f in factors]
        return [0.0 if f is None else k * f.scale for k, f in zip(self.tau_coefficients(gram), factors)]

    def combine(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        out = torch.empty_like(taus[0])
        for m in range(taus.shape[1]):
            per_adapter = taus[:, m]
            gram = [[flat_inner(x, y) for y in per_adapter] for x in per_adapter]
            k = torch.tensor(self.tau_coefficients(gram), dtype=taus.dtype, device=taus.device)
            out[m] = torch.tensordot(k, per_adapter, dims=1)
        return out
