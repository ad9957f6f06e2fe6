"""Model Stock: interpolate between the base and the average of the fine-tunes by their angle.

With ``k`` fine-tunes whose offsets from the base make an average pairwise
cosine ``cos``, the merged weight is ``t * mean(w_i) + (1 - t) * w_0`` with
``t = k cos / (1 + (k - 1) cos)``. The cosine is taken over the whole tensor,
or per filter (last-dim fiber) with ``filter_wise``. Whole-tensor cosines come
from a Gram matrix summed in a fixed block order; per-filter ones are
row-local, so the strategy streams in row chunks either way.
"""

from __future__ import annotations

import torch
from pydantic import Field

from convergent.errors import MergeInputError
from convergent.strategies._geometry import blocked_gram, by_grid_blocks, effective_layout, gram
from convergent.strategies.api import ModelParams, Params, TensorBlocks, TensorTask, strategy


class ModelStockParams(Params):
    filter_wise: bool = Field(False, description="compute the angle per filter (row of the last dim), not per tensor")


def model_stock_ratio(g: torch.Tensor) -> torch.Tensor:
    """Float32 interpolation ratio ``t`` from the Gram matrices ``(..., k, k)`` of the offsets."""
    k = g.shape[-1]
    norms = torch.diagonal(g, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            product = (norms[..., i] * norms[..., j]).clamp(min=1e-6)
            cosines.append((g[..., i, j] / product).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), k * cos / safe)
    return t.to(torch.float32)


def _check(task: TensorTask) -> None:
    if task.base is None:
        raise MergeInputError(f"model_stock needs a base model (tensor {task.name})", "set base_model in the recipe")
    if len(task.models) < 2:
        raise MergeInputError(
            f"model_stock needs at least two fine-tuned models besides the base (tensor {task.name})",
            "add models to the recipe",
        )


def _offsets(task: TensorTask) -> list[torch.Tensor]:
    _check(task)
    assert task.base is not None
    return [m - task.base for m in task.models]


def _layout(params: ModelStockParams, shape: tuple[int, ...]):
    return effective_layout("last" if params.filter_wise else "flat", shape)


def _prepare_model_stock(blocks: TensorBlocks[ModelStockParams, ModelParams]) -> torch.Tensor | None:
    if _layout(blocks.params, blocks.shape) == "last":
        return None
    return model_stock_ratio(blocked_gram(blocks, _offsets, "flat"))


def _interpolate(t: torch.Tensor, base: torch.Tensor, models: list[torch.Tensor] | tuple[torch.Tensor, ...]):
    average = models[0]
    for m in models[1:]:
        average = average + m
    average = average / len(models)
    return t * average + (1 - t) * base


@strategy(
    "model_stock",
    params=ModelStockParams,
    base="required",
    prepare=_prepare_model_stock,
    min_models=2,
    paper="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models (arXiv:2403.19522)",
)
def model_stock(task: TensorTask[ModelStockParams, ModelParams], prepared: torch.Tensor | None) -> torch.Tensor:
    """Move from the base towards the fine-tunes' average by a ratio set by their pairwise angles."""
    assert task.base is not None
    if prepared is not None:
        _check(task)
        return _interpolate(prepared, task.base, task.models)
    offsets = _offsets(task)

    def rows(sl: slice) -> torch.Tensor:
        t = model_stock_ratio(gram([o[sl] for o in offsets], "last")).unsqueeze(-1)
        return _interpolate(t, task.base[sl], [m[sl] for m in task.models])

    return by_grid_blocks(task, rows)
