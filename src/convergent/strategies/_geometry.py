"""Shared maths for the geometric strategies (slerp family, karcher, model_stock, arcee_fusion).

These strategies need inner products: between whole tensors (slerp, karcher,
multislerp), between the last-dim fibers of each row (nuslerp, model_stock
``filter_wise``) or between columns (nuslerp ``nuslerp_row_wise``). Everything
here is computed in float64 over the fixed blocks of
:func:`convergent.determinism.block_rows`, so a tensor merged whole or in
chunks sees the same bits:

* whole-tensor and per-column statistics are summed block by block in
  ``prepare`` (blocks added in order);
* per-fiber statistics are row-local: ``apply`` walks its rows along the same
  block grid (:func:`grid_slices`) and reduces each block on its own.

Reductions avoid PyTorch's single-output parallel path (whose order depends on
the thread count) by summing fixed-width lanes first (:func:`sum_last`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch

from convergent import determinism
from convergent.strategies.api import TensorBlocks, TensorTask
from convergent.strategies.reduce import blocked_sums, sum_last

#: width of the partial sums taken before a final reduction.

#: how vectors are cut into the pieces whose inner products are taken.
Layout = Literal["flat", "last", "first"]


def sum_all(x: torch.Tensor) -> torch.Tensor:
    """Sum of every element (0-d result), thread-count independent."""
    return sum_last(x.reshape(-1))


def effective_layout(layout: Layout, shape: tuple[int, ...]) -> Layout:
    """The layout actually needed for ``shape``.

    Fibers along the last dim of a 0-d/1-D tensor, or columns of a tensor with
    one element per row, are the whole tensor.
    """
    if layout == "last" and len(shape) < 2:
        return "flat"
    if layout == "first" and (len(shape) < 2 or determinism.row_numel(shape) == 1):
        return "flat"
    return layout


def gram(vectors: Sequence[torch.Tensor], layout: Layout) -> torch.Tensor:
    """Inner products ``<v_i, v_j>`` in float64, shape ``(*S, k, k)``.

    ``S`` is ``()`` for "flat", the fiber shape (all dims but the last) for
    "last" and the column shape (all dims but the first) for "first".
    """
    wide = [v.to(torch.float64) for v in vectors]
    k = len(wide)
    entries: dict[tuple[int, int], torch.Tensor] = {}
    for i in range(k):
        for j in range(i, k):
            prod = wide[i] * wide[j]
            if layout == "flat":
                value = sum_all(prod)
            elif layout == "last":
                value = sum_last(prod)
            else:
                value = prod.sum(0)
            entries[i, j] = entries[j, i] = value
    rows = [torch.stack([entries[i, j] for j in range(k)], dim=-1) for i in range(k)]
    return torch.stack(rows, dim=-2)


def blocked_gram(
    blocks: TensorBlocks, vectors: Callable[[TensorTask], Sequence[torch.Tensor]], layout: Layout
) -> torch.Tensor:
    """:func:`gram` over the whole tensor ("flat" or "first"), blocks added in order."""
    if layout == "last":
        raise ValueError("per-fiber statistics are row-local; compute them in apply")
    return blocked_sums(gram(vectors(task), layout) for task in blocks.blocks())


def grid_slices(task: TensorTask) -> Iterator[slice]:
    """Slices of the task's rows cut on the global block grid.

    Row-local statistics computed block by block along this grid are the same
    whichever chunking the engine used (chunks are whole blocks).
    """
    if len(task.shape) == 0:
        yield slice(None)
        return
    start, stop = task.rows
    step = determinism.block_rows(task.shape)
    pos = start
    while pos < stop:
        end = min(stop, (pos // step + 1) * step)
        yield slice(pos - start, end - start)
        pos = end


def by_grid_blocks(task: TensorTask, fn: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` to each grid block of the task's rows and join the results."""
    parts = [fn(sl) for sl in grid_slices(task)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def combine(tensors: Sequence[torch.Tensor], coefficients: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i c_i * x_i`` in float32, left to right, no fused multiply-add.

    Coefficients are float32 scalars or tensors broadcasting against ``x_i``.
    """
    out = tensors[0] * coefficients[0]
    for x, c in zip(tensors[1:], coefficients[1:]):
        out = out + x * c
    return out
