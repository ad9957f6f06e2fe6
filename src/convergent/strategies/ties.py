"""TIES-Merging (mergekit's ``ties``): trim to the top-k magnitudes, elect signs, disjoint mean.

Each task vector keeps exactly its ``k = max(1, int(density * numel))``
largest magnitudes (mergekit's ``magnitude`` sparsification; among elements
tied with the k-th largest magnitude, the first ones in flat order), then the
generalized task arithmetic pipeline of
:mod:`convergent.strategies.task_arithmetic` elects the sign per element and
averages the agreeing deltas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from convergent.strategies.api import TensorTask
from convergent.strategies.task_arithmetic import (
    ZERO_ALL,
    GtaModelParams,
    ModelState,
    OrderStat,
    PieceCut,
    Sparsifier,
    TieClass,
    TieCursor,
    above,
    keep_top,
    register_gta,
    tie_class,
)


class Magnitude(Sparsifier):
    """Keep exactly the ``max(1, int(density * numel))`` largest magnitudes (ties: first in flat order)."""

    name = "magnitude"

    def ranks(self, numel: int, mp: Any) -> tuple[int, ...]:
        return () if mp.density <= 0 else (max(1, int(mp.density * numel)),)

    def plan(self, numel: int, mp: Any, stats: Sequence[OrderStat]) -> tuple[float, TieClass | None] | None:
        """(the k-th largest magnitude, the rule for the elements tied with it), None: keep nothing."""
        if not stats:
            return None
        k = self.ranks(numel, mp)[0]
        return stats[0].value, tie_class(stats[0], k - stats[0].greater)

    def context(self, task: TensorTask[Any, Any], i: int, mp: Any, state: ModelState) -> TieCursor | None:
        ties = state.plan[1] if state.plan is not None else None
        return ties.cursor(task) if ties is not None else None

    def sparsify(self, delta: Tensor, context: Any, start: int, stop: int, mp: Any, state: ModelState) -> Tensor:
        if state.plan is None:
            return delta.zero_()
        return keep_top(delta, state.plan[0], context, start, stop)

    def cut(self, context: TieCursor | None, start: int, stop: int, mp: Any, state: ModelState) -> PieceCut | None:
        """``sparsify`` as a cut: ``|delta| >= threshold`` kept, then the tie rule (``> threshold`` past it)."""
        if state.plan is None:
            return PieceCut(ZERO_ALL)
        threshold = state.plan[0]
        if not math.isfinite(threshold):
            return None  # inputs with Inf/NaN: the tensor path
        fate = True if context is None else context.survive(start, stop)
        if fate is None:
            return PieceCut(threshold, context)
        return PieceCut(threshold if fate else above(threshold))


register_gta(
    "ties",
    sparsifier=Magnitude(),
    consensus=True,
    normalize=True,
    rescale=False,
    model_params=GtaModelParams,
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models (arXiv:2306.01708)",
    summary="Keep each task vector's largest magnitudes, elect a sign per element, average the agreeing deltas.",
)
