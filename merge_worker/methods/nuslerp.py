"""nuslerp (mergekit's, with a base model): spherical interpolation of two task vectors.

t = w_2 / (w_1 + w_2) (0.5 when the weights sum to about 0). Each tau is divided by max(|tau|, 1e-7);
cos = <u_1, u_2> clipped to [-1, 1]; where 1 - cos^2 <= 1e-16 the result is (1-t) tau_1 + t tau_2, else
(sin((1-t) theta) tau_1 + sin(t theta) tau_2) / sin(theta). A task vector that is 0 (an adapter that
skips the module) gives theta = pi/2: sin((1-t) pi/2) tau_1, which is where nuslerp and adaptermerge's
slerp (which falls back to (1-t) tau_1) differ. The whole tensor is one vector (mergekit's default
nuslerp_flatten: true). lambda scales the result.
"""

from __future__ import annotations

import math

from merge_worker.factors import MergeParams
from merge_worker.methods.base import GramMethod

NORM_FLOOR = 1e-7
COLINEAR_EPS = 1e-8


class NuSlerp(GramMethod):
    name = "nuslerp"

    def __init__(self, params: MergeParams, n_adapters: int) -> None:
        if n_adapters != 2:
            raise ValueError(f"nuslerp merges exactly two adapters, got {n_adapters}")
        super().__init__(params, n_adapters)
        total = sum(params.weights)
        self.t = 0.5 if abs(total) < 1e-6 else params.weights[1] / total

    def tau_coefficients(self, gram: list[list[float]]) -> list[float]:
        t, lam = self.t, self.params.lambda_
        norm_a = max(math.sqrt(max(gram[0][0], 0.0)), NORM_FLOOR)
        norm_b = max(math.sqrt(max(gram[1][1], 0.0)), NORM_FLOOR)
        cos = max(-1.0, min(1.0, gram[0][1] / (norm_a * norm_b)))
        if 1 - cos * cos <= COLINEAR_EPS**2:
            return [lam * (1 - t), lam * t]
        theta = math.acos(cos)
        return [lam * math.sin((1 - t) * theta) / math.sin(theta), lam * math.sin(t * theta) / math.sin(theta)]
