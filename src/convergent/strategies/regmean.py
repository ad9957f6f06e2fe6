"""RegMean (Jin et al. 2022): merge linear layers by regression on their inputs.

For a linear-layer weight ``W_i`` of shape [d_out, d_in] whose inputs ``X_i``
have Gram matrix ``G_i = X_i^T X_i`` (statistics kind ``gram``, shape
[d_in, d_in], attached under the weight's tensor name), RegMean solves
``min_W sum_i ||X_i W^T - X_i W_i^T||^2``::

    W* = (sum_i W_i G~_i) (sum_i G~_i)^-1

where ``G~_i`` keeps the diagonal of ``w_i G_i`` and multiplies its
off-diagonal entries by ``alpha`` (``reduce_non_diagonal_ratio``); ``alpha < 1``
pulls the solution towards a per-column average and keeps the system well
conditioned. Solved in float64 with ``torch.linalg.solve``.

Tensors that are not 2-D (biases, norms), and 2-D tensors for which no
contribution has a Gram matrix (embeddings, heads), get the weighted average
``sum_i w_i W_i / sum_i w_i``, as in the paper. Only some contributions with a
Gram matrix, or one of the wrong shape, is a MergeInputError naming the
contribution and the tensor; a singular sum of Grams is one too.
"""

from __future__ import annotations

import torch
from pydantic import Field

from convergent.errors import MergeInputError
from convergent.strategies._negstat_common import is_matrix, weighted_mean
from convergent.strategies._stat_inputs import gather
from convergent.strategies.api import ModelParams, Params, TensorTask, strategy


class RegMeanParams(Params):
    alpha: float = Field(
        1.0,
        ge=0,
        le=1,
        description="scale of the Gram matrices' off-diagonal entries (reduce_non_diagonal_ratio); "
        "0 = per-column average",
    )


class RegMeanModelParams(ModelParams):
    weight: float = Field(
        1.0, gt=0, description="scales this model's Gram matrix (and its weight in the average fallback)"
    )


def regularised_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``gram`` (float64) with its off-diagonal entries multiplied by ``alpha``."""
    diag = torch.diagonal(gram)
    return gram * alpha + torch.diag(diag * (1.0 - alpha))


@strategy(
    "regmean",
    params=RegMeanParams,
    model_params=RegMeanModelParams,
    base="none",
    chunkable=False,
    statistics=("gram",),
    family="statistics",
    memory="whole tensor x (models + 3) in float32 plus 3 x d_in^2 float64 (Gram sums and solve)",
    paper="Jin et al. 2022, Dataless Knowledge Fusion by Merging Weights of Language Models (arXiv:2212.09849)",
)
def regmean(task: TensorTask[RegMeanParams, RegMeanModelParams], _: None) -> torch.Tensor:
    """Regression mean of linear layers from their input Gram matrices; weighted average elsewhere."""
    weights = [mp.weight for mp in task.model_params]
    if not is_matrix(task.shape):
        return weighted_mean(task.models, weights, task.name, "regmean")
    d_in = task.shape[1]
    grams = gather(task, "gram", "regmean", lambda i: (d_in, d_in), "Gram matrix")
    if grams is None:
        return weighted_mean(task.models, weights, task.name, "regmean")
    alpha = task.params.alpha
    lhs = torch.zeros(d_in, d_in, dtype=torch.float64)
    rhs = torch.zeros(task.shape[0], d_in, dtype=torch.float64)
    for w, gram, model in zip(weights, grams, task.models):
        g = regularised_gram(gram.to(torch.float64), alpha) * float(w)
        lhs = lhs + g
        rhs = rhs + model.to(torch.float64) @ g
    # W* lhs = rhs  <=>  lhs^T W*^T = rhs^T
    try:
        merged = torch.linalg.solve(lhs.T, rhs.T).T
    except RuntimeError:  # torch.linalg.LinAlgError: singular system
        merged = None
    if merged is None or not bool(torch.isfinite(merged).all()):
        raise MergeInputError(
            f"regmean: the sum of Gram matrices for tensor {task.name} is singular",
            "some inputs never vary (all-zero Gram rows); lower alpha (e.g. 0.9) to regularise",
        )
    return merged.to(torch.float32)
