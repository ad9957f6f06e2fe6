"""DAM (Gauthier-Caron et al. 2024): merge with per-column scaling coefficients.

Differentiable Adaptive Merging gives every model a trainable coefficient per
input feature (column) of each linear layer, embedding and norm, and merges::

    W = sum_i phi(c_i) * W_i      (c_i broadcast along the last dimension)

where ``phi`` is the optional non-linearity (none, tanh, sigmoid, relu). The
coefficients are learned by DAM's training loop (KL to the source models'
logits plus regularisers); this strategy implements the merge *given* them:
per-model ``merger`` is a scalar (one coefficient for every column; recipe
filters and gradients make it tensor-specific) or a list with one value per
column of this tensor (the last dimension; per element for 1-D tensors). The
default ``merger`` is 1 / number of models, DAM's initialisation. Include the
base model as one of the models to reproduce DAM's ``--use_base_model``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from convergent.errors import MergeInputError
from convergent.strategies.api import ModelParams, Params, TensorTask, strategy


class DamParams(Params):
    non_linearity: Literal["none", "tanh", "sigmoid", "relu"] = Field(
        "none", description="applied to every coefficient before scaling (DAM's non_linearity)"
    )


class DamModelParams(ModelParams):
    merger: float | list[float] | None = Field(
        None,
        description="this model's scaling coefficient(s): one number, or one per column (last dim); default 1/models",
    )


_PHI = {
    "none": lambda x: x,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
}


def _coefficients(task: TensorTask[DamParams, DamModelParams], i: int) -> torch.Tensor | float:
    raw = task.model_params[i].merger
    if raw is None:
        raw = 1.0 / len(task.models)
    phi = _PHI[task.params.non_linearity]
    if not isinstance(raw, list):
        return float(phi(torch.tensor(raw, dtype=torch.float32)))
    columns = task.shape[-1] if task.shape else 1
    if len(raw) != columns:
        raise MergeInputError(
            f"dam: model {i} has {len(raw)} merger coefficients for tensor {task.name} with {columns} columns",
            "give one coefficient per column (last dimension), or a single number",
        )
    coef = phi(torch.tensor(raw, dtype=torch.float32))
    if not task.shape:
        return float(coef[0])
    if len(task.shape) == 1:  # 1-D tensors stream by element: take this chunk's share
        coef = coef[task.rows[0] : task.rows[1]]
    return coef


@strategy(
    "dam",
    params=DamParams,
    model_params=DamModelParams,
    base="none",
    family="task-vector",
    paper="Gauthier-Caron et al. 2024, Merging in a Bottle: Differentiable Adaptive Merging (arXiv:2410.08371)",
)
def dam(task: TensorTask[DamParams, DamModelParams], _: None) -> torch.Tensor:
    """sum_i phi(c_i) * W_i with per-column (or scalar) coefficients c_i given as parameters."""
    out = torch.zeros_like(task.models[0])
    for i, model in enumerate(task.models):
        out = out + model * _coefficients(task, i)
    return out
