"""slerp: spherical interpolation between exactly two task vectors (weights are not used).

theta = arccos(<a,b> / (|a||b|)); delta = lambda * (sin((1-t) theta) a + sin(t theta) b) / sin(theta),
falling back to lambda * ((1-t) a + t b) when |cos theta| > 1 - 1e-6 or either vector is zero. The
result is c_a * a + c_b * b, so with LoRA inputs it stays a sum of low-rank terms; the inner products
come from r x r Gram matrices of the factors, never from out x in matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from merge_worker.factors import LoraFactors, MergeParams
from merge_worker.methods.base import LowRankMethod, factor_inner

PARALLEL_TOLERANCE = 1e-6


def slerp_coefficients(dot: float, sq_norm_a: float, sq_norm_b: float, t: float) -> tuple[float, float]:
    """(c_a, c_b) with slerp(a, b, t) = c_a * a + c_b * b, from <a,b>, |a|^2 and |b|^2."""
    if sq_norm_a <= 0 or sq_norm_b <= 0:
        return 1 - t, t
    cos = max(-1.0, min(1.0, dot / math.sqrt(sq_norm_a * sq_norm_b)))
    if abs(cos) > 1 - PARALLEL_TOLERANCE:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


class Slerp(LowRankMethod):
    name = "slerp"

    def __init__(self, params: MergeParams, n_adapters: int) -> None:
        if n_adapters != 2:
            raise ValueError(f"slerp merges exactly two adapters, got {n_adapters}")
        super().__init__(params, n_adapters)

    def coefficients(self, factors: Sequence[LoraFactors | None]) -> list[float]:
        fa, fb = factors
        dot = 0.0 if fa is None or fb is None else factor_inner(fa, fb)
        sq_a = 0.0 if fa is None else factor_inner(fa, fa)
        sq_b = 0.0 if fb is None else factor_inner(fb, fb)
        ca, cb = slerp_coefficients(dot, sq_a, sq_b, self.params.t)
        lam = self.params.lambda_
        return [0.0 if fa is None else lam * ca * fa.scale, 0.0 if fb is None else lam * cb * fb.scale]

    def combine(self, taus: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        a_all, b_all = taus
        for a, b in zip(a_all, b_all):
            fa, fb = a.reshape(-1), b.reshape(-1)
            ca, cb = slerp_coefficients(
                float(fa @ fb), float(fa @ fa), float(fb @ fb), self.params.t
            )
            a.mul_(self.params.lambda_ * ca).add_(b, alpha=self.params.lambda_ * cb)
        return a_all
