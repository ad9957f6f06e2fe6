"""Task-vector merges that mask and reweight elements: EMR, PCB and CABS.

All three need a base model (``tau_i = model_i - base``), stream in row chunks
and compute their whole-tensor statistics (rescalers, quantiles, sequential
thresholds) in ``prepare`` with the exact block reductions of
:mod:`convergent.strategies.reduce`, so merging a tensor whole or in chunks
gives the same bytes. Their statistics are per tensor; the papers' reference
code takes some of them over the whole flattened model (noted per method).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from pydantic import Field

from convergent import determinism
from convergent.errors import MergeInputError
from convergent.strategies import reduce
from convergent.strategies.api import ModelParams, TensorBlocks, TensorTask, strategy
from convergent.strategies.task_vector_common import FAMILY, TaskWeightParams, finish, lam, with_lambda


def _tvs(task: TensorTask[Any, Any]) -> list[torch.Tensor]:
    """float32 task vectors of the chunk."""
    return task.task_vectors()


# --------------------------------------------------------------------------- EMR


class EmrParams(with_lambda("_EmrBase", "scaling of the (modulated) unified task vector added to the base")):
    task: int | None = Field(
        None,
        ge=0,
        description="index (canonical model order) of the task whose mask and rescaler are applied; "
        "None gives the unified model base + lambda * tau_uni",
    )


def emr_elect(tvs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """EMR's Elect and Mask steps: (tau_uni, [M_i]).

    gamma = sign(sum_i tau_i) (a zero sum counts as negative, as in the
    reference code); M_i = (tau_i * gamma > 0); tau_uni = gamma * max_i |M_i tau_i|.
    """
    total = torch.zeros_like(tvs[0])
    for t in tvs:
        total += t
    gamma = torch.where(total > 0, 1.0, -1.0)
    masks = [(t * gamma) > 0 for t in tvs]
    eps = torch.zeros_like(tvs[0])
    for t, m in zip(tvs, masks):
        eps = torch.maximum(eps, torch.where(m, t.abs(), 0.0))
    return gamma * eps, masks


def _prepare_emr(blocks: TensorBlocks[EmrParams, ModelParams]) -> float | None:
    """The task's rescaler sum|tau_t| / sum|M_t * tau_uni| over the whole tensor."""
    t = blocks.params.task
    if t is None:
        return None
    n = len(blocks.model_params)
    if t >= n:
        raise MergeInputError(f"emr on {blocks.name}: task={t} but only {n} models", f"choose task in 0..{n - 1}")
    num = 0.0
    den = 0.0
    for block in blocks.blocks():
        tvs = _tvs(block)
        uni, masks = emr_elect(tvs)
        num += float(tvs[t].abs().to(torch.float64).sum())
        den += float((uni * masks[t]).abs().to(torch.float64).sum())
    return num / den if den > 0 else 0.0


@strategy(
    "emr",
    params=EmrParams,
    base="required",
    prepare=_prepare_emr,
    family=FAMILY,
    paper="Huang et al. 2024, EMR-Merging: Tuning-Free High-Performance Model Merging (arXiv:2405.17461)",
)
def emr(task: TensorTask[EmrParams, ModelParams], rescaler: float | None) -> torch.Tensor:
    """EMR-Merging: elected unified task vector (sign of the sum, max aligned magnitude).

    A single merged checkpoint cannot carry EMR's per-task modulators, so by
    default this returns the unified model ``base + lambda * tau_uni``. Setting
    ``task: t`` applies task t's modulators instead, giving EMR's task-specific
    model ``base + lambda * r_t * (M_t * tau_uni)`` (one output per task).
    """
    tvs = _tvs(task)
    uni, masks = emr_elect(tvs)
    if task.params.task is None:
        return finish(task, uni, lam(task.params))
    assert rescaler is not None
    return finish(task, uni * masks[task.params.task], lam(task.params) * rescaler)


# --------------------------------------------------------------------------- PCB

#: PCB's outlier clamp of |tau|: the lowest and highest 0.01 % (reference code).
_PCB_CLAMP = 1e-4
#: exp() argument cap: exp(88) is the largest power of e below float32's max.
_EXP_CAP = 88.0


class PcbParams(with_lambda("_PcbBase", "scaling of the merged task vector added to the base")):
    ratio: float = Field(
        0.1, gt=0.0, le=1.0, description="pcb_ratio: fraction of each task's elements kept (by balanced importance)"
    )


#: Tensors up to this many elements are selected in memory (torch.kthvalue) instead of streamed.
IN_MEMORY_SELECT = 1 << 20


def kth_smallest(chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    """The k-th smallest value over all chunks, exactly.

    Up to ``IN_MEMORY_SELECT`` elements the blocks are joined and selected
    directly (``torch.kthvalue``); larger tensors go through the two-pass
    streaming select of ``reduce``, so memory stays bounded. Both give the
    exact k-th value, and the blocks ``prepare`` sees do not depend on how
    ``apply`` is chunked.
    """
    held: list[torch.Tensor] = []
    size = 0
    for chunk in chunks():
        size += chunk.numel()
        if size > IN_MEMORY_SELECT:
            return reduce.kth_smallest(chunks, k)
        held.append(chunk.reshape(-1).to(torch.float32))
    return float(torch.kthvalue(torch.cat(held), k).values)


def top_fraction_threshold(chunks: Callable[[], Iterable[torch.Tensor]], numel: int, fraction: float) -> float:
    """Like :func:`reduce.top_fraction_threshold` (keep values >= it), with the single-block fast path."""
    k = max(1, round(fraction * numel))
    if k >= numel:
        return float("-inf")
    return -kth_smallest(lambda: (-c for c in chunks()), k)


def _sorted_index_value(chunks: Callable[[], Iterable[torch.Tensor]], numel: int, index: int) -> float:
    """sorted(values)[index] over all chunks, exactly (index clamped to 0..numel-1)."""
    index = min(max(index, 0), numel - 1)
    return kth_smallest(chunks, index + 1)


def pcb_scores(tvs: list[torch.Tensor], bounds: list[tuple[float, float]]) -> list[torch.Tensor]:
    """Balanced importance per task: intra-balancing x inter-balancing (float32).

    intra_i = exp(n * norm(clamp|tau_i|)^2) (the softmax numerator; its
    normaliser cancels in the later min-max scaling); inter_i =
    tanh(tau_i * sum_j tau_j), as in the reference implementation.
    """
    n = len(tvs)
    total = torch.zeros_like(tvs[0])
    for t in tvs:
        total += t
    out = []
    for t, (lo, hi) in zip(tvs, bounds):
        a = t.abs().clamp(lo, hi)
        normed = (a - lo) / (hi - lo) if hi > lo else torch.zeros_like(a)
        intra = torch.exp((n * normed * normed).clamp(max=_EXP_CAP))
        inter = torch.tanh(t * total)
        out.append(intra * inter)
    return out


def _prepare_pcb(blocks: TensorBlocks[PcbParams, ModelParams]) -> dict[str, list[tuple[float, float]]]:
    n = len(blocks.model_params)
    numel = blocks.numel
    bounds: list[tuple[float, float]] = []
    for i in range(n):

        def absolute(i: int = i) -> Iterator[torch.Tensor]:
            for block in blocks.blocks():
                yield (block.models[i] - block.base).abs()  # type: ignore[operator]

        lo = _sorted_index_value(absolute, numel, int(numel * _PCB_CLAMP))
        hi = _sorted_index_value(absolute, numel, int(numel * (1 - _PCB_CLAMP)) - 1)
        bounds.append((lo, hi))
    drop: list[tuple[float, float]] = []
    for i in range(n):

        def scores(i: int = i) -> Iterator[torch.Tensor]:
            for block in blocks.blocks():
                yield pcb_scores(_tvs(block), bounds)[i]

        q = _sorted_index_value(scores, numel, int(numel * (1 - blocks.params.ratio)))
        top = max(float(s.max()) for s in scores())
        drop.append((q, top))
    return {"bounds": bounds, "drop": drop}


@strategy(
    "pcb",
    params=PcbParams,
    base="required",
    prepare=_prepare_pcb,
    family=FAMILY,
    paper="Du et al. 2024, Parameter Competition Balancing for Model Merging (PCB-Merging, NeurIPS 2024)",
)
def pcb(task: TensorTask[PcbParams, ModelParams], prepared: dict[str, list[tuple[float, float]]]) -> torch.Tensor:
    """PCB-Merging: intra- and inter-balanced importance, drop the low ones, importance-weighted mean.

    Per task: clamp |tau| to its 0.01 %..99.99 % quantiles; score = intra x
    inter balancing; keep the top ``ratio`` of scores, min-max scaled to
    [0, 1]; merged = sum_i s_i tau_i / sum_i s_i; out = base + lambda * merged.
    Quantiles and min/max are per tensor (the reference code flattens the
    whole model); the per-task coefficients found by evolutionary search in
    the paper are the single ``lambda`` here.
    """
    tvs = _tvs(task)
    bounds = prepared["bounds"]
    scores = pcb_scores(tvs, bounds)
    num = torch.zeros_like(tvs[0])
    den = torch.zeros_like(tvs[0])
    for t, (lo, hi), s, (q, top) in zip(tvs, bounds, scores, prepared["drop"]):
        # All scores equal (e.g. a zero task vector): every element keeps weight 1.
        scale = (s.clamp(q, top) - q) / (top - q) if top > q else torch.ones_like(s)
        clamped = torch.sign(t) * t.abs().clamp(lo, hi)
        num += clamped * scale
        den += scale
    return finish(task, num / den.clamp(min=1e-12), lam(task.params))


# --------------------------------------------------------------------------- CABS


class CabsParams(with_lambda("_CabsBase", "scaling of the merged task vector added to the base")):
    density: float = Field(
        0.5, gt=0.0, le=1.0, description="fraction of elements each task keeps (magnitude mode, when n/m are unset)"
    )
    n: int | None = Field(None, ge=1, description="n of n:m balanced sparsity: keep n elements in every group of m")
    m: int | None = Field(None, ge=1, description="m of n:m balanced sparsity: group size (consecutive elements)")


def _nm(params: CabsParams, name: str) -> tuple[int, int] | None:
    if params.n is None and params.m is None:
        return None
    if params.n is None or params.m is None or params.n > params.m:
        raise MergeInputError(
            f"cabs on {name}: n={params.n}, m={params.m} is not an n:m pattern",
            "give both n and m with n <= m (e.g. n: 2, m: 4), or neither for magnitude pruning",
        )
    return params.n, params.m


def nm_keep(values: torch.Tensor, avail: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """n:m selection on a flat tensor: in each group of m consecutive elements keep
    the n largest ``values`` among the available ones (ties: first wins).

    A last partial group of L < m elements keeps ceil(n L / m).
    """
    score = torch.where(avail, values, -1.0)
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    groups = values.numel() // m
    if groups:
        body = score[: groups * m].reshape(groups, m)
        order = torch.argsort(body, dim=1, descending=True, stable=True)
        chosen = torch.zeros(groups, m, dtype=torch.bool)
        chosen.scatter_(1, order[:, :n], True)
        keep[: groups * m] = chosen.reshape(-1)
    tail = values.numel() - groups * m
    if tail:
        order = torch.argsort(score[groups * m :], descending=True, stable=True)
        keep[groups * m + order[: math.ceil(n * tail / m)]] = True
    return keep & avail


def cabs_masks(
    task: TensorTask[CabsParams, Any], tvs: list[torch.Tensor], thresholds: list[float] | None
) -> list[torch.Tensor]:
    """Conflict-aware sequential masks: task i only picks among positions no earlier task kept."""
    nm = _nm(task.params, task.name)
    if nm is None:
        assert thresholds is not None
        used = torch.zeros(tvs[0].shape, dtype=torch.bool)
        masks = []
        for t, thr in zip(tvs, thresholds):
            keep = ~used & (t.abs() >= thr)
            masks.append(keep)
            used |= keep
        return masks
    n, m = nm
    # Groups run over the flattened rows of each fixed block (determinism.block_rows),
    # so a chunk (always whole blocks) sees exactly the groups the whole tensor does.
    rows = task.rows[1] - task.rows[0]
    step = determinism.block_rows(task.shape)
    flat = [t.reshape(rows, -1) if t.dim() else t.reshape(1, 1) for t in tvs]
    masks = [torch.zeros(f.shape, dtype=torch.bool) for f in flat]
    for start in range(0, max(rows, 1), step):
        stop = min(max(rows, 1), start + step)
        used = torch.zeros((stop - start) * flat[0].shape[1], dtype=torch.bool)
        for f, mask in zip(flat, masks):
            keep = nm_keep(f[start:stop].reshape(-1).abs(), ~used, n, m)
            mask[start:stop] = keep.reshape(stop - start, -1)
            used |= keep
    return [mask.reshape(t.shape) for mask, t in zip(masks, tvs)]


def _prepare_cabs(blocks: TensorBlocks[CabsParams, ModelParams]) -> list[float] | None:
    """Magnitude mode: each task's threshold over the positions earlier tasks left free."""
    if _nm(blocks.params, blocks.name) is not None:
        return None
    thresholds: list[float] = []
    for i in range(len(blocks.model_params)):

        def free_magnitudes(i: int = i) -> Iterator[torch.Tensor]:
            for block in blocks.blocks():
                tvs = _tvs(block)
                used = torch.zeros(tvs[0].shape, dtype=torch.bool)
                for t, thr in zip(tvs[:i], thresholds):
                    used |= t.abs() >= thr
                # Taken positions rank below every free one (|tau| >= 0 > -1).
                yield torch.where(used, -1.0, tvs[i].abs())

        thr = top_fraction_threshold(free_magnitudes, blocks.numel, blocks.params.density)
        thresholds.append(thr)
    return thresholds


@strategy(
    "cabs",
    params=CabsParams,
    model_params=TaskWeightParams,
    base="required",
    prepare=_prepare_cabs,
    family=FAMILY,
    paper="Yang et al. 2025, CABS: Conflict-Aware and Balanced Sparsification for Enhancing Model Merging",
)
def cabs(task: TensorTask[CabsParams, TaskWeightParams], thresholds: list[float] | None) -> torch.Tensor:
    """CABS: conflict-aware sequential pruning (n:m balanced or magnitude) then weighted sum.

    Tasks are pruned in canonical order; each one can only keep positions that
    no earlier task kept, so the kept sets never overlap. With ``n``/``m`` the
    pruning is n:m (keep the n largest |tau| of every m consecutive elements);
    without, each task keeps its top ``density`` fraction by magnitude.
    out = base + lambda * sum_i weight_i * (mask_i * tau_i).
    """
    tvs = _tvs(task)
    masks = cabs_masks(task, tvs, thresholds)
    merged = torch.zeros_like(tvs[0])
    for t, mask, mp in zip(tvs, masks, task.model_params):
        merged += (t * mask) * mp.weight
    return finish(task, merged, lam(task.params))
