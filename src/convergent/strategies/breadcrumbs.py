"""Model Breadcrumbs (mergekit's ``breadcrumbs`` and ``breadcrumbs_ties``): drop outliers and small changes.

Per task vector (mergekit's ``magnitude_outliers``), sorting magnitudes in
ascending order: the top ``n_top = int(gamma * numel)`` are outliers, the
``target = int(density * numel)`` below them are kept (fewer outliers are
dropped when there is not room for both), the rest is zeroed: exactly the
band's size survives, ``lo <= |delta| <= hi`` with lo/hi the magnitudes at
the band's ends (exact order statistics) and, among elements tied with an
end, the first ones in flat order. With density >= 1 nothing is dropped
(gamma is then ignored, as in mergekit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field
from torch import Tensor

from convergent.strategies.api import TensorTask
from convergent.strategies.task_arithmetic import (
    GtaModelParams,
    ModelState,
    OrderStat,
    Sparsifier,
    TieClass,
    keep_bottom,
    keep_top,
    register_gta,
    tie_class,
)

PAPER = (
    "Davari & Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (arXiv:2312.06795)"
)


class BreadcrumbsModelParams(GtaModelParams):
    gamma: float = Field(0.01, description="fraction of the largest-magnitude elements dropped as outliers")


def band(numel: int, density: float, gamma: float) -> tuple[int, int] | None:
    """Ascending-order positions ``(first, last)`` of the kept band, None if empty (mergekit's slice)."""
    target = int(density * numel)
    n_top = int(gamma * numel)
    first = max(0, numel - target - n_top)
    last = min(first + target, numel) - 1
    return None if last < first else (first, last)


@dataclass(frozen=True)
class BandPlan:
    lo: float | None  # smallest kept magnitude, None: no lower cut
    hi: float | None  # largest kept magnitude, None: no upper cut
    lo_ties: TieClass | None  # rule for the elements tied with lo (with lo == hi: the whole band)
    hi_ties: TieClass | None  # rule for the elements tied with hi


class MagnitudeOutliers(Sparsifier):
    """Keep a band of magnitudes: drop the ``gamma`` largest and the smallest, keep ``density``."""

    name = "magnitude_outliers"

    def _ends(self, numel: int, mp: Any) -> tuple[bool, int, int]:
        """(empty, k of the lower end or 0, k of the upper end or 0), as k-th largest ranks."""
        kept = band(numel, mp.density, mp.gamma)
        if kept is None:
            return True, 0, 0
        first, last = kept
        return False, (numel - first if first > 0 else 0), (numel - last if last < numel - 1 else 0)

    def ranks(self, numel: int, mp: Any) -> tuple[int, ...]:
        _, lo, hi = self._ends(numel, mp)
        return tuple(k for k in (lo, hi) if k)

    def plan(self, numel: int, mp: Any, stats: Sequence[OrderStat]) -> BandPlan | None:
        """The band's ends and tie rules (exactly the band's size survives); None: drop everything."""
        empty, k_lo, k_hi = self._ends(numel, mp)
        if empty:
            return None
        found = iter(stats)
        lo = next(found) if k_lo else None
        hi = next(found) if k_hi else None
        # descending ranks k_hi..k_lo survive; a tie class spans ranks greater+1..greater+equal
        if lo is not None and hi is not None and lo.value == hi.value:
            lo_ties, hi_ties = tie_class(lo, k_lo - k_hi + 1), None
        else:
            lo_ties = tie_class(lo, k_lo - lo.greater) if lo is not None else None
            hi_ties = tie_class(hi, hi.greater + hi.equal - k_hi + 1) if hi is not None else None
        return BandPlan(lo.value if lo is not None else None, hi.value if hi is not None else None, lo_ties, hi_ties)

    def context(self, task: TensorTask[Any, Any], i: int, mp: Any, state: ModelState) -> tuple[Any, Any]:
        plan = state.plan
        if plan is None:
            return None, None
        return (
            plan.lo_ties.cursor(task) if plan.lo_ties is not None else None,
            plan.hi_ties.cursor(task) if plan.hi_ties is not None else None,
        )

    def sparsify(self, delta: Tensor, context: Any, start: int, stop: int, mp: Any, state: ModelState) -> Tensor:
        plan = state.plan
        if plan is None:
            return delta.zero_()
        lo_ties, hi_ties = context
        if plan.hi is not None:
            keep_bottom(delta, plan.hi, hi_ties, start, stop)
        if plan.lo is not None:
            keep_top(delta, plan.lo, lo_ties, start, stop)
        return delta


register_gta(
    "breadcrumbs",
    sparsifier=MagnitudeOutliers(),
    consensus=False,
    normalize=False,
    rescale=False,
    model_params=BreadcrumbsModelParams,
    paper=PAPER,
    summary="Drop each task vector's outliers and smallest changes, add the weighted sum to the base.",
)

register_gta(
    "breadcrumbs_ties",
    sparsifier=MagnitudeOutliers(),
    consensus=True,
    normalize=False,
    rescale=False,
    model_params=BreadcrumbsModelParams,
    paper=PAPER,
    summary="Breadcrumbs sparsification followed by TIES sign election.",
)
