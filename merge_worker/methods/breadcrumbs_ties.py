"""breadcrumbs_ties: breadcrumbs' sparsification, then TIES sign election (normalize false by default,
as in mergekit)."""

from __future__ import annotations

from merge_worker.methods.breadcrumbs import Breadcrumbs


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    elects_sign = True
