"""Helpers shared by the task-vector strategy modules (registers no strategy).

Task-vector methods merge ``tau_i = model_i - base`` and return
``base + lambda * merged``. ``lambda`` is a Python keyword, so the parameter
classes that carry it are built with :func:`pydantic.create_model` and read
with :func:`lam`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, create_model

from convergent.strategies.api import ModelParams, Params, TensorTask

#: Family name shared by every task-vector strategy.
FAMILY = "task-vector"


def with_lambda(name: str, description: str, default: float = 1.0) -> Any:
    """A ``Params`` class with one float field literally named ``lambda`` (subclass it to add more)."""
    return create_model(name, __base__=Params, **{"lambda": (float, Field(default, description=description))})


def lam(params: Params) -> float:
    """The ``lambda`` field of a parameter object built by :func:`with_lambda`."""
    return float(getattr(params, "lambda"))


class TaskWeightParams(ModelParams):
    """Per-model scaling of the task vector (task arithmetic's lambda_i)."""

    weight: float = Field(1.0, description="lambda_i: scaling of this model's task vector before merging")


def task_vectors64(task: TensorTask[Any, Any]) -> list[torch.Tensor]:
    """``model_i - base`` in float64 (exact for float32 inputs of similar magnitude)."""
    if task.base is None:
        raise ValueError(f"{task.name}: this strategy needs a base model")
    base = task.base.to(torch.float64)
    return [m.to(torch.float64) - base for m in task.models]


def finish(task: TensorTask[Any, Any], delta: torch.Tensor, scale: float) -> torch.Tensor:
    """``base + scale * delta`` computed in float64 and rounded once to float32."""
    assert task.base is not None
    out = task.base.to(torch.float64) + scale * delta.to(torch.float64).reshape(task.base.shape)
    return out.to(torch.float32)


def mean_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum in canonical order (float64), divided by the count."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t in tensors:
        acc += t
    return acc / len(tensors)


def is_matrix(shape: tuple[int, ...]) -> bool:
    """Whether the spectral methods treat a tensor of ``shape`` as a matrix.

    Tensors with two or more dimensions are viewed as ``shape[0] x rest``
    (a conv kernel becomes out_channels x (in_channels * kh * kw)); vectors
    and scalars are not matrices and take each method's documented fallback.
    """
    return len(shape) >= 2 and shape[0] > 0 and int(torch.Size(shape[1:]).numel()) > 0


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U diag(S) Vh`` in float64."""
    u, s, vh = torch.linalg.svd(mat.to(torch.float64), full_matrices=False)
    return u, s, vh


def polar(mat: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P Q^T`` of ``mat = P diag(s) Q^T``.

    The closest matrix with orthonormal columns (or rows, if wide) to ``mat``
    in Frobenius norm: the orthogonalisation used by TSV-Merge and Iso-CTS.
    """
    p, _, qh = torch.linalg.svd(mat, full_matrices=False)
    return p @ qh
