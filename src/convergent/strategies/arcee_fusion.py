"""Arcee Fusion: keep the other model's changes only where they matter most.

Importance of each element is ``|other - base|`` times the KL divergence between
the softmaxes (along the last dim) of the other model and the base. Elements
whose importance reaches ``median + 1.5 * IQR`` of all importances take the
other model's value; the rest keep the base.

mergekit estimates the quartiles from a random sample of one million values
when a tensor is larger than that (unseeded, so not reproducible); convergent
always uses the exact quartiles of the whole tensor (same index rule), which
is what the sample estimates, and the same on every replica.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from convergent.errors import MergeInputError
from convergent.strategies._geometry import sum_all, sum_last
from convergent.strategies.api import ModelParams, Params, TensorBlocks, TensorTask, strategy
from convergent.strategies.reduce import kth_smallest

_EPS = 1e-8
_QUANTILES = (0.25, 0.5, 0.75)

#: tensors up to this many elements get their quartiles by selection in memory;
#: larger ones by the streaming exact selection of ``reduce`` (same values).
IN_MEMORY_QUANTILES = 1 << 22


def _check(task: TensorTask) -> None:
    if task.base is None or len(task.models) != 1:
        raise MergeInputError(
            f"arcee_fusion merges one model into a base model (tensor {task.name})",
            "set base_model and list exactly one other model",
        )


def fiber_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) || softmax(y)) along the last dim (each softmax + 1e-8), float32, float64 inside."""
    p = F.softmax(x.to(torch.float64), dim=-1) + _EPS
    q = F.softmax(y.to(torch.float64), dim=-1) + _EPS
    return sum_last(p * torch.log(p / q)).to(torch.float32)


def _flat_kl(blocks: TensorBlocks) -> torch.Tensor:
    """:func:`fiber_kl` for a 0-d/1-D tensor whose single fiber spans blocks (three passes)."""

    def pairs():
        for task in blocks.blocks():
            _check(task)
            yield task.models[0].reshape(-1).to(torch.float64), task.base.reshape(-1).to(torch.float64)

    mx = my = float("-inf")
    for x, y in pairs():
        mx = max(mx, float(x.max()))
        my = max(my, float(y.max()))
    sx = sy = 0.0
    for x, y in pairs():
        sx += float(sum_all(torch.exp(x - mx)))
        sy += float(sum_all(torch.exp(y - my)))
    kl = 0.0
    for x, y in pairs():
        p = torch.exp(x - mx) / sx + _EPS
        q = torch.exp(y - my) / sy + _EPS
        kl += float(sum_all(p * torch.log(p / q)))
    return torch.tensor(kl, dtype=torch.float32)


def _importance(task: TensorTask, kl: torch.Tensor) -> torch.Tensor:
    assert task.base is not None
    diff = (task.models[0] - task.base).abs()
    if kl.dim() == 0:
        return diff * kl
    return diff * kl[task.rows[0] : task.rows[1]].unsqueeze(-1)


def _prepare(blocks: TensorBlocks[Params, ModelParams]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(blocks.shape) >= 2:
        parts = []
        for task in blocks.blocks():
            _check(task)
            parts.append(fiber_kl(task.models[0], task.base))
        kl = torch.cat(parts, dim=0)
    else:
        kl = _flat_kl(blocks)
    n = blocks.numel
    if n == 0:
        return kl, torch.tensor(0.0)
    ranks = (torch.tensor(_QUANTILES) * (n - 1)).long()
    if n <= IN_MEMORY_QUANTILES:
        values = torch.cat([_importance(t, kl).reshape(-1) for t in blocks.blocks()])
        q1, median, q3 = (torch.kthvalue(values, r + 1).values for r in ranks.tolist())
    else:
        picks = [kth_smallest(lambda: (_importance(t, kl) for t in blocks.blocks()), r + 1) for r in ranks.tolist()]
        q1, median, q3 = torch.tensor(picks, dtype=torch.float32)
    return kl, median + 1.5 * (q3 - q1)


@strategy(
    "arcee_fusion",
    base="required",
    prepare=_prepare,
    min_models=1,
    max_models=1,
    memory="streams in row chunks; prepare keeps one KL value per last-dim fiber and, for tensors up to "
    "4M elements, their importances (float32)",
    paper="Arcee AI 2025, Arcee Fusion (arcee.ai blog; mergekit arXiv:2403.13257)",
)
def arcee_fusion(task: TensorTask[Params, ModelParams], prepared: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Take the other model's values where their KL-weighted change is an upper outlier."""
    _check(task)
    assert task.base is not None
    kl, threshold = prepared
    mask = (_importance(task, kl) >= threshold).to(torch.float32)
    return task.base + (task.models[0] - task.base) * mask
