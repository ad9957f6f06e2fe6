"""Weighted averaging: the simplest merge and the model soup baseline."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from convergent.errors import MergeInputError
from convergent.strategies import kernels
from convergent.strategies.api import ModelParams, Params, TensorTask, strategy


class LinearParams(Params):
    normalize: bool = Field(True, description="divide by the sum of weights")


class LinearModelParams(ModelParams):
    weight: float = Field(1.0, description="mixing weight of this model")


def weighted_sum(
    tensors: list[torch.Tensor] | tuple[torch.Tensor, ...],
    weights: list[float],
    normalize: bool,
    name: str,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """sum_i w_i x_i (divided by sum_i w_i when normalize), accumulated in order, in float32.

    Inputs may be in any floating dtype (``raw_inputs``). Each product is
    rounded before it is added, as in mergekit's ``(tensors * weights).sum(0)``
    (``add_(x, alpha=w)`` would fuse them into one rounding). Float32 or
    bfloat16 inputs take ``fused_kernels.weighted_sum`` instead (once it is
    loaded; big pieces wait for it, see ``kernels.for_size``): one pass over
    the stored bytes, the same operations, so the same bits. There an
    ``out_dtype`` of bfloat16 is produced directly, rounded as the engine's
    cast would; otherwise the result is float32.
    """
    total = sum(weights)
    if normalize and total == 0:
        raise MergeInputError(
            f"weights sum to zero for tensor {name} with normalize: true",
            "give non-zero weights or set normalize: false",
        )
    fused = kernels.for_size(tensors[0].numel())
    if fused is not None and kernels.kernel_ready(tensors[0], tensors[1:]) and all(t.is_contiguous() for t in tensors):
        narrow = out_dtype == torch.bfloat16
        out = torch.empty(tensors[0].shape, dtype=torch.bfloat16 if narrow else torch.float32)
        fused.weighted_sum(
            tuple(kernels.raw_array(t.reshape(-1)) for t in tensors),
            np.asarray(weights, dtype=np.float32),
            normalize,
            np.float32(total),
            kernels.raw_array(out.view(-1)),
        )
        return out
    out = tensors[0].to(torch.float32) * weights[0]
    for w, x in zip(weights[1:], tensors[1:]):
        x = x.to(torch.float32)
        out.add_(x if w == 1.0 else x * w)
    if normalize:
        out.div_(total)
    return out


@strategy(
    "linear",
    params=LinearParams,
    model_params=LinearModelParams,
    base="none",
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
    propagates_nonfinite=True,  # w * NaN, w * Inf and 0 * Inf are all non-finite
    raw_inputs=True,
    warm_up=kernels.load,
)
def linear(task: TensorTask[LinearParams, LinearModelParams], _: None) -> torch.Tensor:
    """Weighted average of the models' weights."""
    weights = [mp.weight for mp in task.model_params]
    return weighted_sum(task.models, weights, task.params.normalize, task.name, task.out_dtype)
