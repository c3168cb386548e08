"""model_stock (Jang et al., 2024; mergekit's, filter_wise false): delta = lambda * t * mean_i tau_i.

cos = the mean over adapter pairs of <tau_a, tau_b> / max(|tau_a| |tau_b|, 1e-6), clipped to [-1, 1];
t = N cos / (1 + (N - 1) cos), and t = 0 (the base) where |1 + (N - 1) cos| < 1e-6. An adapter that skips
the module has tau = 0 there and still counts in N. Weights are not used.
"""

from __future__ import annotations

from merge_worker.factors import MergeParams
from merge_worker.methods.base import GramMethod


class ModelStock(GramMethod):
    name = "model_stock"

    def __init__(self, params: MergeParams, n_adapters: int) -> None:
        if n_adapters < 2:
            raise ValueError(f"model_stock needs two adapters or more, got {n_adapters}")
        super().__init__(params, n_adapters)

    def tau_coefficients(self, gram: list[list[float]]) -> list[float]:
        n = len(gram)
        cosines = [
            max(-1.0, min(1.0, gram[a][b] / max((gram[a][a] * gram[b][b]) ** 0.5, 1e-6)))
            for a in range(n) for b in range(a + 1, n)
        ]
        cos = sum(cosines) / len(cosines)
        denominator = 1 + (n - 1) * cos
        t = 0.0 if abs(denominator) < 1e-6 else n * cos / denominator
        return [self.params.lambda_ * t / n] * n
