"""DELLA (mergekit's ``della`` and ``della_linear``): magnitude-ranked random drop (MagPrune).

Per task vector (mergekit's ``della_magprune``): within each row (along
dim 1; a 1-D tensor is one row) magnitudes are ranked, ``rank_norm`` maps them
linearly to [0, 1] and an element survives with probability
``density - epsilon + 2 * epsilon * rank_norm``, drawn by
``task.keep_mask(f"della/{i}", probabilities)`` (chunk-invariant). With ``rescale`` (the
default) survivors are scaled by ``sum|delta| / sum|kept|`` over the whole
tensor. ``della`` elects signs like TIES and normalizes; ``della_linear`` sums.

Rows are ranked with a stable sort (equal magnitudes ranked by position;
mergekit's argsort leaves that order unspecified). 1-D tensors are ranked
whole, as in mergekit: ``prepare`` keeps their ranks (4 bytes per element per
model), which is small for biases and norms. A row of one element (mergekit
divides 0 by 0 there) survives with probability ``density``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from convergent.strategies import kernels
from convergent.strategies.api import TensorBlocks, TensorTask
from convergent.strategies.task_arithmetic import (
    GtaModelParams,
    ModelState,
    Sparsifier,
    delta_of,
    register_gta,
)

PAPER = (
    "Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling "
    "(arXiv:2406.11617)"
)


class DellaModelParams(GtaModelParams):
    epsilon: float = Field(
        0.15, description="spread of keep probabilities: density - epsilon (smallest) to density + epsilon (largest)"
    )

    @model_validator(mode="after")
    def _probabilities(self) -> DellaModelParams:
        if 0 < self.density < 1 and (self.density + self.epsilon >= 1 or self.density - self.epsilon <= 0):
            raise ValueError("epsilon must be chosen such that density +/- epsilon is in (0, 1)")
        return self


def rank_norm(magnitudes: Tensor, dim: int) -> np.ndarray:
    """Ranks of ``magnitudes`` (>= 0) along ``dim`` (0 = smallest) divided by (length - 1): float32, same shape.

    Equal magnitudes are ranked by position (a stable order). The ranks come
    from a stable radix sort of the float bits (``fused_kernels.row_ranks``),
    or without numba from one numpy sort of unique int64 keys
    ``(float bits << 32) | position`` (``sorted_ranks``): the same ranks.
    """
    length = magnitudes.shape[dim]
    if length <= 1:
        return np.full(tuple(magnitudes.shape), 0.5, dtype=np.float32)
    moved = magnitudes.movedim(dim, -1).contiguous()
    rows = moved.reshape(-1, length).numpy()
    fused = kernels.waited()
    if fused is not None:  # the same ranks by a radix sort (fused_kernels.row_ranks)
        ranks = fused.row_ranks(rows.view(np.uint32), np.empty(rows.shape, dtype=np.float32))
        return np.moveaxis(ranks.reshape(moved.shape), -1, dim)
    return np.moveaxis(sorted_ranks(rows).reshape(moved.shape), -1, dim)


def sorted_ranks(rows: np.ndarray) -> np.ndarray:
    """``rank_norm`` of 2-D float32 ``rows`` (>= 0) along each row, by numpy's sort (the reference)."""
    length = rows.shape[1]
    position = np.arange(length, dtype=np.int64)
    keys = rows.view(np.int32).astype(np.int64)
    keys <<= 32
    keys |= position
    keys.sort(axis=1)
    keys &= 0xFFFFFFFF  # now the positions in ascending order of magnitude
    ranks = np.empty(rows.shape, dtype=np.float32)
    np.put_along_axis(ranks, keys, np.broadcast_to(position.astype(np.float32), rows.shape), axis=1)
    ranks /= np.float32(length - 1)
    return ranks


def keep_probabilities(rank: np.ndarray, density: float, epsilon: float) -> Tensor:
    """mergekit's ``(density - epsilon) + rank_norm * 2 * epsilon`` in float32 (a new contiguous tensor)."""
    probs = np.multiply(rank, np.float32(2), dtype=np.float32)
    probs *= np.float32(epsilon)
    probs += np.float32(density - epsilon)
    return torch.from_numpy(np.ascontiguousarray(probs))


class DellaMagprune(Sparsifier):
    """Keep elements with a probability rising linearly with their magnitude rank in the row."""

    name = "della_magprune"
    stochastic = True
    masks = True
    keeps_masks = True

    def whole(self, blocks: TensorBlocks[Any, Any], i: int, mp: Any) -> Any:
        if len(blocks.shape) >= 2 or mp.density <= 0:
            return None
        magnitudes = torch.cat([delta_of(blk, i).reshape(-1).abs_() for blk in blocks.blocks()])
        return rank_norm(magnitudes, 0)  # numpy, whole tensor

    def context(self, task: TensorTask[Any, Any], i: int, mp: Any, state: ModelState) -> Tensor | None:
        """1.0 where the element survives (uniform < its keep probability), else 0.0."""
        if mp.density <= 0:
            return None
        delta = delta_of(task, i)
        if delta.dim() >= 2:
            rank = rank_norm(delta.abs_(), 1)
        else:
            start, stop = task.rows
            rank = state.extra[start:stop].reshape(tuple(delta.shape))
        probs = keep_probabilities(rank, mp.density, mp.epsilon)
        return task.keep_mask(f"della/{i}", probs)

    def sparsify(self, delta: Tensor, context: Any, start: int, stop: int, mp: Any, state: ModelState) -> Tensor:
        if context is None:
            return delta.zero_()
        return delta.mul_(context[start:stop])


register_gta(
    "della",
    sparsifier=DellaMagprune(),
    consensus=True,
    normalize=True,
    rescale=True,
    model_params=DellaModelParams,
    paper=PAPER,
    summary="Drop task-vector elements with magnitude-ranked probabilities (rescaling the rest), elect signs, average.",
)

register_gta(
    "della_linear",
    sparsifier=DellaMagprune(),
    consensus=False,
    normalize=False,
    rescale=True,
    model_params=DellaModelParams,
    paper=PAPER,
    summary="Drop task-vector elements with magnitude-ranked probabilities (rescaling the rest), add the weighted sum.",
)
