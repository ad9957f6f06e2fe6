"""Fisher merging (Matena & Raffel 2021).

Each contribution carries the diagonal of its Fisher information (statistics
kind ``fisher``, same shape as the weight). Per element::

    theta* = sum_i w_i (F_i + epsilon) theta_i / sum_i w_i (F_i + epsilon)

``epsilon`` (MergeLM/FusionBench's ``minimal_fisher_weight``) is added to every
Fisher value so the division stays finite; with ``epsilon: 0`` a model whose
Fisher is zero is ignored exactly, and an element where every Fisher value is
zero gets the weighted average.

Statistics rule (see ``_stat_inputs``): a tensor for which no contribution has
a Fisher diagonal (e.g. one left out when the statistics were computed) is
merged by the weighted average ``sum_i w_i theta_i / sum_i w_i``; a tensor for
which only some contributions have one, or one of the wrong shape, negative or
non-finite, is a MergeInputError naming the contribution and the tensor.

Simplification: FusionBench's ``normalize_fisher_weight`` divides each model's
Fisher by its norm over the *whole model*; a per-tensor strategy cannot see
that, so it is left out (scale Fisher files before attaching them if needed).
"""

from __future__ import annotations

import torch
from pydantic import Field

from convergent.strategies._negstat_common import weighted_mean
from convergent.strategies._stat_inputs import gather, same_shape
from convergent.strategies.api import ModelParams, Params, TensorTask, strategy


class FisherParams(Params):
    epsilon: float = Field(
        1e-8,
        ge=0,
        description="added to every Fisher value before weighting (minimal_fisher_weight); keeps the division finite",
    )


class FisherModelParams(ModelParams):
    weight: float = Field(
        1.0, ge=0, description="scaling coefficient of this model's Fisher (fisher_scaling_coefficient)"
    )


@strategy(
    "fisher",
    params=FisherParams,
    model_params=FisherModelParams,
    base="none",
    statistics=("fisher",),
    family="statistics",
    paper="Matena & Raffel 2021, Merging Models with Fisher-Weighted Averaging (arXiv:2111.09832)",
)
def fisher(task: TensorTask[FisherParams, FisherModelParams], _: None) -> torch.Tensor:
    """Fisher-weighted average: sum_i w_i F_i theta_i / sum_i w_i F_i (weighted average without Fisher)."""
    weights = [mp.weight for mp in task.model_params]
    average = weighted_mean(task.models, weights, task.name, "fisher")
    fishers = gather(task, "fisher", "fisher", same_shape(task), "Fisher diagonal", nonnegative=True)
    if fishers is None:
        return average
    eps = task.params.epsilon
    num = torch.zeros_like(task.models[0])
    den = torch.zeros_like(task.models[0])
    for w, f, x in zip(weights, fishers, task.models):
        fw = (f + eps) * float(w)
        num = num + fw * x
        den = den + fw
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), average)
