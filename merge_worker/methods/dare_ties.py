"""dare_ties: DARE's random drop and rescale of each tau_i, then TIES steps 2-4. mergekit's defaults
(conventions mergekit) differ from adaptermerge's: no division by the kept weights (normalize false) and
an L1-norm rescale instead of 1/density."""

from __future__ import annotations

from merge_worker.methods.dare_linear import DareLinear


class DareTies(DareLinear):
    name = "dare_ties"
    elects_sign = True
    default_normalize = (True, False)
