"""RAM and RAM+ (tensor-local): merge sparse task vectors without diluting unique updates.

Per element, a model "contributes" when ``|model - base| > epsilon``. Where
several models contribute their task vectors are averaged; where exactly one
does its update is kept whole (RAM) or rescaled by
``1 + r * clamp(shared_i / unique_i, 0, alpha)`` (RAM+, with model i's counts of
shared and unique elements over the whole tensor). Counts are exact integers
summed over fixed blocks, so the strategies stream in row chunks.
"""

from __future__ import annotations

import torch
from pydantic import Field

from convergent.errors import MergeInputError
from convergent.strategies.api import ModelParams, Params, TensorBlocks, TensorTask, strategy

PAPER = "Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (arXiv:2601.13572)"


class RamParams(Params):
    epsilon: float = Field(1e-5, description="a task-vector element counts as changed when its magnitude exceeds this")


class RamPlusParams(Params):
    r: float = Field(0.1, description="strength of the rescaling of unique updates")
    alpha: float = Field(0.2, description="cap on the shared/unique ratio used in the rescaling")
    epsilon: float = Field(1e-5, description="a task-vector element counts as changed when its magnitude exceeds this")


def _masks(task: TensorTask, epsilon: float):
    """Task vectors, their non-zero masks, and the overlap/unique masks and clamped counts."""
    if task.base is None:
        raise MergeInputError(f"{task.name}: RAM needs a base model", "set base_model in the recipe")
    tvs = [m - task.base for m in task.models]
    nonzero = [tv.abs() > epsilon for tv in tvs]
    counts = torch.zeros(task.base.shape, dtype=torch.int32)
    for nz in nonzero:
        counts = counts + nz
    return tvs, nonzero, counts > 1, counts == 1, counts.clamp(min=1)


def _merge(task: TensorTask, epsilon: float, scales: list[torch.Tensor] | None) -> torch.Tensor:
    assert task.base is not None
    if not task.models:
        return task.base.clone()
    tvs, nonzero, overlap, unique, denominator = _masks(task, epsilon)
    merged: torch.Tensor | None = None
    for i, (tv, nz) in enumerate(zip(tvs, nonzero)):
        kept = tv * nz
        own = kept * unique if scales is None else kept * unique * scales[i]
        term = own + kept * overlap / denominator
        merged = term if merged is None else merged + term
    assert merged is not None
    return task.base + merged


@strategy(
    "ram",
    params=RamParams,
    base="required",
    min_models=0,
    paper=PAPER,
)
def ram(task: TensorTask[RamParams, ModelParams], _: None) -> torch.Tensor:
    """Average task-vector elements changed by several models, keep those changed by one."""
    return _merge(task, task.params.epsilon, None)


def ramplus_scales(shared: list[int], unique: list[int], params: RamPlusParams) -> list[torch.Tensor]:
    """Per-model float32 factors ``1 + r * clamp(shared / max(unique, epsilon), 0, alpha)``."""
    rho = torch.tensor(shared, dtype=torch.int64) / torch.tensor(unique, dtype=torch.int64).clamp(min=params.epsilon)
    lam = 1 + params.r * rho.clamp(min=0, max=params.alpha)
    return list(lam.to(torch.float32).unbind(0))


def _prepare_ramplus(blocks: TensorBlocks[RamPlusParams, ModelParams]) -> list[torch.Tensor]:
    k = len(blocks.model_params)
    shared = [0] * k
    unique = [0] * k
    if k == 0:
        return []
    for task in blocks.blocks():
        _, nonzero, overlap, only, _ = _masks(task, blocks.params.epsilon)
        for i, nz in enumerate(nonzero):
            shared[i] += int((nz & overlap).sum())
            unique[i] += int((nz & only).sum())
    return ramplus_scales(shared, unique, blocks.params)


@strategy(
    "ramplus_tl",
    params=RamPlusParams,
    base="required",
    prepare=_prepare_ramplus,
    min_models=0,
    paper=PAPER,
)
def ramplus_tl(task: TensorTask[RamPlusParams, ModelParams], prepared: list[torch.Tensor]) -> torch.Tensor:
    """RAM with each model's unique updates rescaled by its shared/unique ratio in the tensor."""
    return _merge(task, task.params.epsilon, prepared)
