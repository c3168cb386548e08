"""dare_ties: DARE's random drop and 1/density rescale of each tau_i, then TIES steps 2-4."""

from __future__ import annotations

from merge_worker.methods.dare_linear import DareLinear


class DareTies(DareLinear):
    name = "dare_ties"
    elects_sign = True
