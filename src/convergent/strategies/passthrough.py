"""Passthrough: copy the single input tensor, optionally scaled (used for layer stacking/frankenmerges)."""

from __future__ import annotations

import torch
from pydantic import Field

from convergent.errors import MergeInputError
from convergent.strategies.api import ModelParams, Params, TensorTask, strategy


class PassthroughModelParams(ModelParams):
    scale: float | None = Field(None, description="multiply the tensor by this factor (unset: copy unchanged)")


@strategy(
    "passthrough",
    model_params=PassthroughModelParams,
    base="none",
    min_models=1,
    max_models=1,
    paper="mergekit passthrough (Goddard et al. 2024, arXiv:2403.13257)",
)
def passthrough(task: TensorTask[Params, PassthroughModelParams], _: None) -> torch.Tensor:
    """Copy the one input tensor unchanged, or multiplied by its scale."""
    if len(task.models) != 1:
        raise MergeInputError(
            f"passthrough takes exactly one input per tensor; got {len(task.models)} for {task.name}",
            "use slices to pick which model each layer comes from",
        )
    scale = task.model_params[0].scale
    x = task.models[0]
    return x.clone() if scale is None else x * scale
