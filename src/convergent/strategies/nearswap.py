"""NearSwap: take the other model's value where it is close to the base, keep the base elsewhere."""

from __future__ import annotations

import torch
from pydantic import Field

from convergent.errors import MergeInputError
from convergent.strategies.api import ModelParams, Params, TensorTask, strategy


class NearSwapParams(Params):
    t: float = Field(
        description="distance scale: weight of the other model is clamp(t / |base - other|, 0, 1) per element"
    )


@strategy(
    "nearswap",
    params=NearSwapParams,
    base="required",
    min_models=1,
    max_models=1,
    paper="alchemonaut 2024, NearSwap (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001); "
    "as in mergekit (arXiv:2403.13257)",
)
def nearswap(task: TensorTask[NearSwapParams, ModelParams], _: None) -> torch.Tensor:
    """Interpolate each element towards the other model by t / |difference| (capped at 1)."""
    if task.base is None or len(task.models) != 1:
        raise MergeInputError(
            f"nearswap merges one model with a base model (tensor {task.name})",
            "set base_model and list exactly one other model",
        )
    a = task.base
    b = task.models[0]
    weight = (task.params.t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a
