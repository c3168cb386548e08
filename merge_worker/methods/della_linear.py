"""della_linear: della's magnitude-ranked random drop and rescale, then a linear merge (normalize false
by default, as in mergekit)."""

from __future__ import annotations

from merge_worker.methods.della import Della


class DellaLinear(Della):
    name = "della_linear"
    elects_sign = False
    default_normalize = (False, False)
