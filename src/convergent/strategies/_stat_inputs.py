"""Checking the per-model statistics (Fisher diagonals, Gram matrices, scores).

Statistics reach a strategy as ``task.extras[kind][i]``, aligned with
``task.models``. The rule shared by every statistics-aware strategy here:

* no model has the statistic for this tensor: return None, and the strategy
  uses its documented fallback (e.g. a weighted average);
* some models have it and others do not: a MergeInputError naming the
  contribution (its index in canonical order) and the tensor;
* a statistic of the wrong shape, or with NaN/inf (or negative values where
  only non-negative ones make sense): a MergeInputError likewise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from convergent.errors import MergeInputError
from convergent.strategies.api import TensorTask

_HINT = (
    "compute the statistics on each contribution's own checkpoint ('convergent stats') and attach them ('add --stats')"
)


def _where(task: TensorTask, shape: tuple[int, ...]) -> str:
    if task.is_whole:
        return str(shape)
    return f"{shape} for rows {task.rows[0]}:{task.rows[1]}"


def gather(
    task: TensorTask,
    kind: str,
    method: str,
    expected: Callable[[int], tuple[int, ...]],
    label: str,
    nonnegative: bool = False,
) -> list[torch.Tensor] | None:
    """The float32 statistics ``kind`` of every model, checked; None when no model has any.

    ``expected(i)`` is the shape model i's statistic must have (for the rows in
    this task when the strategy streams in chunks).
    """
    stats = task.extras.get(kind)
    if stats is None or all(s is None for s in stats):
        return None
    if len(stats) != len(task.models):
        raise MergeInputError(
            f"{method}: {len(stats)} {label} entries for {len(task.models)} contributions on tensor {task.name}",
            _HINT,
        )
    have = next(i for i, s in enumerate(stats) if s is not None)
    out: list[torch.Tensor] = []
    for i, stat in enumerate(stats):
        if stat is None:
            raise MergeInputError(
                f"{method}: contribution {i} has no {label} for tensor {task.name} (contribution {have} has)",
                _HINT + ", or to none of them for this tensor",
            )
        want = expected(i)
        got = tuple(stat.shape)
        if got != want:
            raise MergeInputError(
                f"{method}: {label} of contribution {i} for tensor {task.name} has shape {_where(task, got)}, "
                f"expected {_where(task, want)}",
                _HINT,
            )
        value = stat.to(torch.float32)
        if not bool(torch.isfinite(value).all()):
            raise MergeInputError(f"{method}: {label} of contribution {i} for tensor {task.name} has NaN or inf", _HINT)
        if nonnegative and bool((value < 0).any()):
            raise MergeInputError(
                f"{method}: {label} of contribution {i} for tensor {task.name} has negative values", _HINT
            )
        out.append(value)
    return out


def same_shape(task: TensorTask) -> Callable[[int], tuple[int, ...]]:
    """``expected`` for row-aligned statistics: the shape of model i's rows."""
    return lambda i: tuple(task.models[i].shape)
