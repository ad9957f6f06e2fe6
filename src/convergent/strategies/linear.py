"""Weighted averaging: the simplest merge and the model soup baseline."""

from __future__ import annotations

import torch
from pydantic import Field

from convergent.errors import MergeInputError
from convergent.strategies.api import ModelParams, Params, TensorTask, strategy


class LinearParams(Params):
    normalize: bool = Field(True, description="divide by the sum of weights")


class LinearModelParams(ModelParams):
    weight: float = Field(1.0, description="mixing weight of this model")


def weighted_sum(
    tensors: list[torch.Tensor] | tuple[torch.Tensor, ...], weights: list[float], normalize: bool, name: str
) -> torch.Tensor:
    """sum_i w_i x_i (divided by sum_i w_i when normalize), accumulated in order."""
    out = tensors[0] * weights[0]
    for w, x in zip(weights[1:], tensors[1:]):
        out.add_(x, alpha=w)
    if normalize:
        total = sum(weights)
        if total == 0:
            raise MergeInputError(
                f"weights sum to zero for tensor {name} with normalize: true",
                "give non-zero weights or set normalize: false",
            )
        out.div_(total)
    return out


@strategy(
    "linear",
    params=LinearParams,
    model_params=LinearModelParams,
    base="none",
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
    propagates_nonfinite=True,  # w * NaN, w * Inf and 0 * Inf are all non-finite
)
def linear(task: TensorTask[LinearParams, LinearModelParams], _: None) -> torch.Tensor:
    """Weighted average of the models' weights."""
    weights = [mp.weight for mp in task.model_params]
    return weighted_sum(task.models, weights, task.params.normalize, task.name)
