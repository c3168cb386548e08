"""ties (Yadav et al., 2023): trim each tau_i, weight, elect a sign per entry, disjoint mean
(merge_worker.methods.sparse_merge.elect_and_disjoint_mean spells out steps 2-4). mergekit's ties is the
same with normalize true (the default of both); its conventions differ in rounding and sign ties only."""

from __future__ import annotations

from merge_worker.methods.magnitude_prune import MagnitudePrune


class Ties(MagnitudePrune):
    """magnitude_prune's trim, then sign election and disjoint mean instead of a plain sum."""

    name = "ties"
    elects_sign = True
    default_normalize = (True, True)
