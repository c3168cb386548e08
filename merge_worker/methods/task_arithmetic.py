"""task_arithmetic (Ilharco et al., 2022; mergekit's name): lambda * sum_i w_i * tau_i, normalize false by
default under both conventions (adaptermerge's `linear`)."""

from __future__ import annotations

from merge_worker.methods.linear import Linear


class TaskArithmetic(Linear):
    name = "task_arithmetic"
    default_normalize = (False, False)
