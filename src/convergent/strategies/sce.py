"""SCE (mergekit's ``sce``): Select by variance, Calculate weights, Erase minority signs.

With task vectors ``tau_i = model_i - base`` (mergekit 0.1.5's ``sce_merge``):

1. Select: with ``select_topk < 1`` keep only the elements whose variance
   across the models (population variance) is among the
   ``k = int(nonzero * select_topk)`` largest, ``nonzero`` counting elements
   of non-zero variance (exactly k: among variances tied with the k-th
   largest, the first ones in flat order);
2. Calculate: model i's weight is the mean of its selected ``tau_i**2`` over
   the whole tensor, normalized to sum to 1 (uniform when they sum below 1e-6);
3. Erase: per element keep the ``tau_i`` whose sign is the sign of their sum;
4. the merged task vector is ``sum_i w_i tau_i [kept] / max(sum_i w_i [kept], 1e-6)``.

The variance threshold and the weights are whole-tensor statistics computed
in ``prepare`` (exact radix select; float64 sums per block, in block order),
so the strategy streams in row chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from convergent.strategies.api import ModelParams, Params, TensorBlocks, TensorTask, strategy
from convergent.strategies.order_stats import MagnitudeSelect
from convergent.strategies.task_arithmetic import (
    FAMILY,
    GRAIN,
    TieClass,
    keep_top,
    square_sum,
    tie_class,
)

# --------------------------------------------------------------------------- sign consensus (SCE's variant)


def _sum_into(out: Tensor, terms: Sequence[Tensor]) -> Tensor:
    """``out = terms[0] + terms[1] + ...``, added in order."""
    if len(terms) == 1:
        return out.copy_(terms[0])
    torch.add(terms[0], terms[1], out=out)
    for t in terms[2:]:
        out.add_(t)
    return out


def majority_sign(
    deltas: Sequence[Tensor], method: str, out: Tensor | None = None, ones: Tensor | None = None
) -> Tensor:
    """+1 where the majority sign is positive or tied, -1 where negative.

    ``sum``: sign of the summed deltas (TIES' elected sign, mergekit's
    ``get_mask(method="sum")``); ``count``: sign of the number of positive
    minus negative deltas. Written to ``out`` when given; ``ones`` is an
    optional tensor of ones of the same size.
    """
    total = torch.empty_like(deltas[0]) if out is None else out
    if method == "sum":
        _sum_into(total, deltas)
    elif method == "count":
        torch.sign(deltas[0], out=total)
        for d in deltas[1:]:
            total.add_(torch.sign(d))
    else:
        raise ValueError(f"unknown consensus method {method!r}")
    # +1 on ties (mergekit: sum >= 0). The sum is -0.0 only when every delta is
    # +-0, and those elements take no delta whatever the sign.
    return torch.copysign(torch.ones_like(total) if ones is None else ones, total, out=total)


def consensus_sum(
    deltas: Sequence[Tensor],
    sign: Tensor,
    weights: Sequence[float] | None,
    acc: Tensor | None = None,
    div: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(sum_i |delta_i| [agrees], sum_i w_i [agrees])``, delta_i agreeing when its sign is ``sign``.

    The deltas are consumed (overwritten). ``delta_i * agree_i`` equals
    ``sign * relu(delta_i * sign)`` exactly, so ``sign * first`` is mergekit's
    ``(deltas * mask).sum(0)`` and ``second`` its divisor (None when
    ``weights`` is None). ``acc``/``div`` are optional output buffers.
    """
    for d in deltas:
        d.mul_(sign).clamp_(min=0)
    acc = _sum_into(torch.empty_like(deltas[0]) if acc is None else acc, deltas)
    if weights is None:
        return acc, None
    div = torch.empty_like(deltas[0]) if div is None else div
    torch.mul(deltas[0].sign_(), weights[0], out=div)
    for d, w in zip(deltas[1:], weights[1:]):
        div.add_(d.sign_(), alpha=w)  # w * {0, 1}: exact, as mergekit's sum of weights * mask
    return acc, div


class SceParams(Params):
    int8_mask: bool = Field(False, description="store masks as int8 to save memory (no effect on the result)")
    select_topk: float = Field(
        1.0, description="fraction of elements (of non-zero variance across models) kept, by largest variance"
    )


#: elements per piece of the float64 variance computation (one thread, in cache).
VAR_PIECE = GRAIN


def _variance(tvs: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across models per element, float32.

    Welford's update in float64, the algorithm (and accumulation type) of
    ``torch.var`` on CPU that mergekit calls, elementwise so a chunk gives the
    same bits as the whole tensor (and several times faster than ``torch.var``
    over a stacked dimension).
    """
    flats = [tv.reshape(-1) for tv in tvs]
    total = flats[0].numel()
    out = torch.empty(total, dtype=torch.float32)
    piece = min(VAR_PIECE, max(1, total))
    mean, m2, x, delta, step = (torch.empty(piece, dtype=torch.float64) for _ in range(5))
    for start in range(0, total, piece):
        stop = min(total, start + piece)
        size = stop - start
        mu, acc, xs, ds, st = mean[:size], m2[:size], x[:size], delta[:size], step[:size]
        mu.copy_(flats[0][start:stop])
        acc.zero_()
        for count, flat in enumerate(flats[1:], start=2):
            xs.copy_(flat[start:stop])
            torch.sub(xs, mu, out=ds)
            mu.add_(torch.div(ds, count, out=st))
            acc.add_(ds.mul_(xs.sub_(mu)))
        out[start:stop] = acc.div_(len(flats))
    return out.view(tvs[0].shape)


def _variance_stream(blk: TensorTask[Any, Any]):
    var = _variance(blk.task_vectors()).reshape(-1)
    return lambda _i, start, stop, out: out.copy_(var[start:stop])


def _selected(task: TensorTask[Any, Any], threshold: float | None, ties: TieClass | None) -> list[torch.Tensor]:
    """Task vectors of the chunk with the variance selection applied (None threshold: keep all)."""
    tvs = task.task_vectors()
    if threshold is None:
        return tvs
    if threshold == float("inf"):
        return [tv.zero_() for tv in tvs]
    var = _variance(tvs)
    flat = var.view(-1)
    cursor = ties.cursor(task) if ties is not None else None
    for start in range(0, flat.numel(), GRAIN):
        stop = min(flat.numel(), start + GRAIN)
        keep_top(flat[start:stop], threshold, cursor, start, stop)
    keep = var.sign_()  # 1 where selected (variance > 0 there), else 0
    return [tv.mul_(keep) for tv in tvs]


Prepared = tuple[float | None, TieClass | None, list[float]]


def _prepare(blocks: TensorBlocks[SceParams, ModelParams]) -> Prepared:
    """(variance threshold: None no selection, +inf nothing kept; rule for tied variances; float32 weights)."""
    n = len(blocks.model_params)
    topk = blocks.params.select_topk
    threshold: float | None = None
    ties: TieClass | None = None
    if n and blocks.numel and topk < 1:
        threshold = float("inf")
        if topk > 0:
            select = MagnitudeSelect(blocks, _variance_stream, [0], count_zeros=True)
            nonzero = blocks.numel - select.zeros[0]
            # mergekit: int(count_nonzero(var) * density), a float32 product.
            k = int(torch.tensor(nonzero, dtype=torch.int64) * topk)
            if k > 0:
                stat = select.kth_largest({0: [k]})[0][0]
                threshold, ties = stat.value, tie_class(stat, k - stat.greater)
    squares = [0.0] * n
    if n and blocks.numel and threshold != float("inf"):
        for blk in blocks.blocks():
            for i, tv in enumerate(_selected(blk, threshold, ties)):
                squares[i] += square_sum(tv)
    means = torch.tensor(squares, dtype=torch.float64).div_(max(1, blocks.numel)).to(torch.float32)
    total = float(means.sum())
    if abs(total) < 1e-6:
        weights = torch.full((n,), 1.0 / max(1, n), dtype=torch.float32)
    else:
        weights = means / total
    return threshold, ties, [float(w) for w in weights]


@strategy(
    "sce",
    params=SceParams,
    base="required",
    prepare=_prepare,
    paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE merging) (arXiv:2408.07990)",
    family=FAMILY,
)
def sce(task: TensorTask[SceParams, ModelParams], prepared: Prepared) -> torch.Tensor:
    """Select high-variance elements, weight models by their mean squared task vector, erase minority signs."""
    base = task.base
    if base is None:
        raise ValueError(f"{task.name}: sce needs a base model")
    if not task.models:
        return base.clone()
    threshold, ties, weights = prepared
    tvs = _selected(task, threshold, ties)
    sign = majority_sign(tvs, "sum")
    # mergekit multiplies each selected tau_i by its (erased) weight before summing.
    for tv, w in zip(tvs, weights):
        tv.mul_(w)
    acc, div = consensus_sum(tvs, sign, weights)
    assert div is not None
    return acc.mul_(sign).div_(div.clamp_(min=1e-6)).add_(base)
