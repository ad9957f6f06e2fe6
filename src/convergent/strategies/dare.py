"""DARE (mergekit's ``dare_linear`` and ``dare_ties``): drop task-vector elements at random.

Each element of model i's task vector survives with probability ``density``
(an independent draw, ``task.keep_mask(f"dare/{i}", density)``: chunk-invariant
and seeded by the merge). With ``rescale`` (the default) the survivors are
scaled by ``sum|delta| / sum|kept|`` over the whole tensor, mergekit's L1
rescaling (the paper's ``1 / density`` in expectation). ``dare_ties`` then
elects signs like TIES; ``dare_linear`` sums like task arithmetic.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from convergent.strategies.api import TensorTask
from convergent.strategies.task_arithmetic import GtaModelParams, ModelState, Sparsifier, register_gta

PAPER = "Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models (arXiv:2311.03099)"


class Random(Sparsifier):
    """Keep each element with probability ``density`` (mergekit's ``random``/bernoulli)."""

    name = "random"
    stochastic = True
    masks = True

    def context(self, task: TensorTask[Any, Any], i: int, mp: Any, state: ModelState) -> Tensor:
        """1.0 where ``uniform < density`` (the element survives), else 0.0."""
        return task.keep_mask(f"dare/{i}", mp.density)

    def sparsify(self, delta: Tensor, context: Any, start: int, stop: int, mp: Any, state: ModelState) -> Tensor:
        return delta.mul_(context[start:stop])


register_gta(
    "dare_ties",
    sparsifier=Random(),
    consensus=True,
    normalize=False,
    rescale=True,
    model_params=GtaModelParams,
    paper=PAPER,
    summary="Drop task-vector elements at random (rescaling the rest), elect signs, sum the agreeing deltas.",
)

register_gta(
    "dare_linear",
    sparsifier=Random(),
    consensus=False,
    normalize=False,
    rescale=True,
    model_params=GtaModelParams,
    paper=PAPER,
    summary="Drop task-vector elements at random (rescaling the rest) and add the weighted sum to the base.",
)
