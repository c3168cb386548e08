"""The merge methods, one class per method, looked up by the name used in `spec.method`."""

from __future__ import annotations

from merge_worker.factors import MergeParams
from merge_worker.methods.base import LowRankMethod, MergeMethod
from merge_worker.methods.breadcrumbs import Breadcrumbs
from merge_worker.methods.breadcrumbs_ties import BreadcrumbsTies
from merge_worker.methods.cat import Cat
from merge_worker.methods.dare_linear import DareLinear
from merge_worker.methods.dare_ties import DareTies
from merge_worker.methods.della import Della
from merge_worker.methods.della_linear import DellaLinear
from merge_worker.methods.linear import Linear
from merge_worker.methods.magnitude_prune import MagnitudePrune
from merge_worker.methods.model_stock import ModelStock
from merge_worker.methods.nuslerp import NuSlerp
from merge_worker.methods.sce import Sce
from merge_worker.methods.slerp import Slerp
from merge_worker.methods.task_arithmetic import TaskArithmetic
from merge_worker.methods.ties import Ties

REGISTRY: dict[str, type[MergeMethod]] = {
    cls.name: cls
    for cls in (
        Linear, Cat, MagnitudePrune, Ties, DareLinear, DareTies, Slerp, TaskArithmetic, Breadcrumbs,
        BreadcrumbsTies, Della, DellaLinear, NuSlerp, ModelStock, Sce,
    )
}

__all__ = ["REGISTRY", "LowRankMethod", "MergeMethod", "make_method"]


def make_method(params: MergeParams, n_adapters: int) -> MergeMethod:
    """The method `params.method` set up for `n_adapters` adapters (ValueError on bad parameters)."""
    try:
        cls = REGISTRY[params.method]
    except KeyError:
        raise ValueError(f"unknown merge method {params.method!r}; known: {sorted(REGISTRY)}") from None
    return cls(params, n_adapters)
