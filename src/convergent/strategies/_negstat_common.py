"""Small helpers shared by the task-vector and statistics-aware strategies.

Elementwise sums are written as separate multiply and add steps (never fused
``add_(x, alpha=w)``), so every element is rounded the same way whatever the
length of the chunk it sits in: a tensor merged whole or in row chunks gives
the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, create_model

from convergent.errors import MergeInputError
from convergent.strategies.api import Params


def lambda_params(name: str, default: float, description: str, doc: str = "") -> type[Params]:
    """A Params base class with a field literally named ``lambda`` (mergekit's spelling)."""
    cls = create_model(name, __base__=Params, **{"lambda": (float, Field(default, description=description))})
    cls.__doc__ = doc or f"Parameters of {name}."
    return cls


def lam(params: Any) -> float:
    """The ``lambda`` field of ``params``."""
    return float(getattr(params, "lambda"))


def weighted_total(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i, accumulated in the given order (float32, elementwise)."""
    out = torch.zeros_like(tensors[0])
    for w, x in zip(weights, tensors):
        out = out + x * float(w)
    return out


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float], name: str, method: str) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i; a MergeInputError when the weights sum to zero."""
    total = float(sum(weights))
    if total == 0:
        raise MergeInputError(
            f"{method}: model weights sum to zero for tensor {name}",
            "give the models non-zero weights",
        )
    return weighted_total(tensors, weights) / total


def is_matrix(shape: tuple[int, ...]) -> bool:
    """True for 2-D tensors (linear-layer weights, embeddings)."""
    return len(shape) == 2
