"""Safety-aware merges: ``safe_merge`` (SafeMERGE) and ``led_merge`` (LED-Merging).

``safe_merge`` (Djuhera et al. 2025). The base model is the aligned model that
was fine-tuned; the models are the fine-tuned one (``role: finetuned``), a
safety-tuned one (``role: safe``) and optionally the unaligned model the
aligned one came from (``role: unaligned``). SafeLoRA's alignment matrix is
``V = base - unaligned`` (without an unaligned model: ``V = safe - base``) and
its projection ``C = V V^T / ||V||_F``. For each 2-D tensor with fine-tuning
update ``D = finetuned - base``::

    rho = cos(C D, D)            (Frobenius cosine over the whole tensor)
    rho <  threshold: theta = base + finetuned_weight * D + safe_weight * (safe - base)
    rho >= threshold: theta = finetuned

Partial w.r.t. the paper: SafeMERGE works on LoRA adapters (cosine of the
projected B A product, PEFT's linear/DARE-linear combination of the two
adapters); here the same test and a linear combination are applied to dense
weight differences. Tensors that are not 2-D keep the fine-tuned values.

``led_merge`` (Ma et al. 2025, Location-Election-Disjoint). Location: each
weight gets an importance score (SNIP, ``|theta * grad L|`` on task data),
attached per contribution as statistics ``importance`` (score of the
fine-tuned model i on its task data) and ``base_importance`` (score of the
base model on model i's task data), both shaped like the weight. Election:
model i keeps the elements in the top ``density_i`` fraction of *both*
scores. Disjoint: an element elected by more than one model is dropped from
all of them. Merge::

    theta = base + sum_i weight_i * mask_i * (theta_i - base)

The thresholds are exact whole-tensor order statistics (``prepare``), so the
strategy streams in chunks. Without statistics for a tensor (no contribution
has them) the scores fall back to magnitudes ``|theta_i|`` and ``|base|``, the
proxy LED-Merging improves on; partial statistics are an error. Computing
SNIP scores needs gradients on data and is outside this strategy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field

from convergent.errors import RecipeError
from convergent.strategies import reduce
from convergent.strategies._negstat_common import is_matrix
from convergent.strategies._stat_inputs import gather, same_shape
from convergent.strategies.api import ModelParams, Params, TensorBlocks, TensorTask, strategy

# --------------------------------------------------------------------------- SafeMERGE


class SafeMergeParams(Params):
    threshold: float = Field(
        0.35,
        description="cosine threshold: layers whose update is less aligned than this are merged with the safe model",
    )
    finetuned_weight: float = Field(0.8, description="weight of the fine-tuned update in merged layers")
    safe_weight: float = Field(0.2, description="weight of the safety model's update in merged layers")


class SafeMergeModelParams(ModelParams):
    role: Literal["finetuned", "safe", "unaligned"] = Field(
        description="finetuned: the model to protect; safe: the safety-tuned model; unaligned: defines V = base - it"
    )


def _roles(task: TensorTask[SafeMergeParams, SafeMergeModelParams]) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for model, mp in zip(task.models, task.model_params):
        if mp.role in found:
            raise RecipeError(f"safe_merge: more than one model has role '{mp.role}'", "give each role at most once")
        found[mp.role] = model
    for needed in ("finetuned", "safe"):
        if needed not in found:
            raise RecipeError(f"safe_merge: no model has role '{needed}'", "mark models with role: finetuned / safe")
    return found


def alignment_cosine(v: torch.Tensor, d: torch.Tensor) -> float:
    """cos(C d, d) with C = v v^T / ||v||_F (the scale of C cancels); 0 when either side is zero."""
    v64 = v.to(torch.float64)
    d64 = d.to(torch.float64)
    if v.shape[0] <= v.shape[1]:
        cd = (v64 @ v64.T) @ d64
    else:
        cd = v64 @ (v64.T @ d64)
    n1 = float(torch.linalg.vector_norm(cd))
    n2 = float(torch.linalg.vector_norm(d64))
    if n1 == 0 or n2 == 0:
        return 0.0
    return float((cd * d64).sum()) / (n1 * n2)


@strategy(
    "safe_merge",
    params=SafeMergeParams,
    model_params=SafeMergeModelParams,
    base="required",
    chunkable=False,
    min_models=2,
    max_models=3,
    family="task-vector",
    memory="whole tensor x (models + 2) float32, 3 x whole tensor float64 and min(d_out, d_in)^2 float64",
    paper="Djuhera et al. 2025, SafeMERGE: Preserving Safety Alignment in Fine-Tuned LLMs via Selective "
    "Layer-Wise Model Merging (arXiv:2503.17239)",
)
def safe_merge(task: TensorTask[SafeMergeParams, SafeMergeModelParams], _: None) -> torch.Tensor:
    """Merge a layer with the safety model only where its update leaves the safety subspace (cosine < threshold)."""
    assert task.base is not None
    roles = _roles(task)
    finetuned, safe = roles["finetuned"], roles["safe"]
    if not is_matrix(task.shape):
        return finetuned
    v = task.base - roles["unaligned"] if "unaligned" in roles else safe - task.base
    d = finetuned - task.base
    if alignment_cosine(v, d) >= task.params.threshold:
        return finetuned
    p = task.params
    return task.base + d * p.finetuned_weight + (safe - task.base) * p.safe_weight


# --------------------------------------------------------------------------- LED-Merging


class LedMergeParams(Params):
    disjoint: bool = Field(True, description="drop elements elected by more than one model (the Disjoint step)")


class LedMergeModelParams(ModelParams):
    density: float = Field(
        0.1, gt=0, le=1, description="fraction of elements in the top of both importance scores (the mask rate r_i)"
    )
    weight: float = Field(1.0, description="scaling coefficient of this model's masked task vector")


def _scores(task: TensorTask[LedMergeParams, LedMergeModelParams]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(fine-tuned scores, base scores) per model for the rows in ``task``."""
    assert task.base is not None
    ft = gather(task, "importance", "led_merge", same_shape(task), "importance scores", nonnegative=True)
    base = gather(task, "base_importance", "led_merge", same_shape(task), "base importance scores", nonnegative=True)
    if ft is None:
        ft = [m.abs() for m in task.models]
    if base is None:
        base = [task.base.abs()] * len(task.models)
    return ft, base


def _thresholds(blocks: TensorBlocks[LedMergeParams, LedMergeModelParams]) -> list[tuple[float, float]]:
    """Per model, the smallest fine-tuned and base score inside its top ``density`` fraction."""
    out = []
    for i, mp in enumerate(blocks.model_params):

        def chunks(which: int, i: int = i) -> Iterator[torch.Tensor]:
            for block in blocks.blocks():
                yield _scores(block)[which][i]

        ft = reduce.top_fraction_threshold(lambda: chunks(0), blocks.numel, mp.density)
        base = reduce.top_fraction_threshold(lambda: chunks(1), blocks.numel, mp.density)
        out.append((ft, base))
    return out


@strategy(
    "led_merge",
    params=LedMergeParams,
    model_params=LedMergeModelParams,
    base="required",
    prepare=_thresholds,
    statistics=("importance", "base_importance"),
    family="task-vector",
    paper="Ma et al. 2025, LED-Merging: Mitigating Safety-Utility Conflicts in Model Merging with "
    "Location-Election-Disjoint (ACL 2025, arXiv:2502.16770)",
)
def led_merge(
    task: TensorTask[LedMergeParams, LedMergeModelParams], thresholds: list[tuple[float, float]]
) -> torch.Tensor:
    """Task vectors masked to elements important in both base and fine-tuned model, disjoint across models."""
    assert task.base is not None
    ft, base = _scores(task)
    masks = [(ft[i] >= t_ft) & (base[i] >= t_base) for i, (t_ft, t_base) in enumerate(thresholds)]
    if task.params.disjoint and len(masks) > 1:
        count = torch.zeros_like(task.base, dtype=torch.int32)
        for m in masks:
            count = count + m.to(torch.int32)
        shared = count > 1
        masks = [m & ~shared for m in masks]
    out = task.base.clone()
    for model, mask, mp in zip(task.models, masks, task.model_params):
        out = out + torch.where(mask, model - task.base, torch.zeros_like(model)) * mp.weight
    return out
