"""LiNeS: layer-increasing network scaling of a merged task vector."""

from __future__ import annotations

import torch
from pydantic import Field

from convergent.strategies.api import Params, TensorTask, strategy
from convergent.strategies.task_vector_common import FAMILY, TaskWeightParams, finish


class LinesParams(Params):
    alpha: float | None = Field(
        None,
        description="alpha: scaling of the shallowest layer (and of non-layer tensors); None = 1 / number of models",
    )
    beta: float = Field(0.5, description="beta: extra scaling reached at the deepest layer (scale = alpha + beta)")


def lines_scale(alpha: float, beta: float, layer: int | None, num_layers: int | None) -> float:
    """lambda(l) = alpha + beta * l / (L - 1) for layer l in 0..L-1; alpha off the layer stack."""
    if layer is None or num_layers is None:
        return alpha
    if num_layers <= 1:
        return alpha
    return alpha + beta * layer / (num_layers - 1)


@strategy(
    "lines",
    params=LinesParams,
    model_params=TaskWeightParams,
    base="required",
    family=FAMILY,
    paper="Wang et al. 2025, LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging (ICLR)",
)
def lines(task: TensorTask[LinesParams, TaskWeightParams], _: None) -> torch.Tensor:
    """LiNeS on task arithmetic: base + (alpha + beta * l/(L-1)) * sum_i weight_i tau_i.

    ``l`` is the tensor's layer index (0-based) and ``L`` the number of layers,
    both from the engine (``task.layer``/``task.num_layers``). Tensors outside
    the numbered layers (embeddings, final norm, lm_head) or without a known
    layer count are scaled by ``alpha``, as the reference code does for every
    parameter it cannot place in a block. With ``beta = 0`` this is task
    arithmetic with lambda = alpha.
    """
    alpha = task.params.alpha if task.params.alpha is not None else 1.0 / len(task.models)
    scale = lines_scale(alpha, task.params.beta, task.layer, task.num_layers)
    merged = torch.zeros_like(task.models[0], dtype=torch.float64)
    for tv, mp in zip(task.task_vectors(), task.model_params):
        merged += tv.to(torch.float64) * mp.weight
    return finish(task, merged, scale)
