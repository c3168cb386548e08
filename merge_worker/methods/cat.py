"""cat: the linear delta, stored exactly as the concatenation of the scaled factors (rank = sum of ranks)."""

from __future__ import annotations

from merge_worker.methods.linear import Linear


class Cat(Linear):
    name = "cat"
    stores_concatenation = True
    default_normalize = (False, False)  # not a mergekit name: the same under both conventions
