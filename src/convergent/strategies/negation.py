"""Forgetting by task-vector negation: ``negative`` and ``split_unlearn``.

``negative`` (Ilharco et al. 2023, task negation): subtract the task vectors
of the models to forget from the base::

    theta = base - lambda * sum_i w_i (theta_i - base)

Merging the result back with ``+lambda`` times the same task vector (task
arithmetic) returns the base.

``split_unlearn`` keeps retain and forget contributions apart. Each model says
whether it is to be forgotten (per-model ``forget: true``); with
``tau_r = sum_{retain} w_i tau_i`` and ``tau_f = sum_{forget} w_i tau_i``::

    tau_f' = tau_f - (<tau_f, tau_r> / <tau_r, tau_r>) tau_r   (when orthogonalize)
    theta  = base + lambda * tau_r - forget_lambda * tau_f'

Removing from the forget direction its component along the retain direction
(one Gram-Schmidt step over the whole tensor) means forgetting does not undo
what the retained models add. The dot products are whole-tensor statistics
computed block by block in ``prepare`` (float64, fixed order), so the
strategy still streams in chunks. With no forget model it is task arithmetic
of the retain models: the merge step of Split-Unlearn-Merge (Kadhe et al.
2024), whose unlearning itself is training on data splits and happens before.
"""

from __future__ import annotations

import torch
from pydantic import Field

from convergent.strategies._negstat_common import lam, lambda_params, weighted_total
from convergent.strategies.api import ModelParams, TensorBlocks, TensorTask, strategy

NegativeBase = lambda_params(
    "NegativeBase",
    1.0,
    "scaling coefficient of the negated task vector: base - lambda * sum_i weight_i * tau_i",
)


class NegativeParams(NegativeBase):  # type: ignore[valid-type,misc]
    """Parameters of ``negative``."""


class NegativeModelParams(ModelParams):
    weight: float = Field(1.0, description="weight of this model's task vector in the sum that is subtracted")


@strategy(
    "negative",
    params=NegativeParams,
    model_params=NegativeModelParams,
    base="required",
    family="task-vector",
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089), task negation",
)
def negative(task: TensorTask[NegativeParams, NegativeModelParams], _: None) -> torch.Tensor:
    """Task negation: base - lambda * sum_i w_i (model_i - base)."""
    assert task.base is not None
    tau = weighted_total(task.task_vectors(), [mp.weight for mp in task.model_params])
    return task.base - tau * lam(task.params)


SplitBase = lambda_params("SplitBase", 1.0, "scaling coefficient of the retained task vectors' sum")


class SplitUnlearnParams(SplitBase):  # type: ignore[valid-type,misc]
    """Parameters of ``split_unlearn``."""

    forget_lambda: float = Field(1.0, description="scaling coefficient of the subtracted (forget) task vectors' sum")
    orthogonalize: bool = Field(
        True, description="remove from the forget direction its component along the retain direction first"
    )


class SplitUnlearnModelParams(ModelParams):
    weight: float = Field(1.0, description="weight of this model's task vector within its group")
    forget: bool = Field(False, description="true: this model holds knowledge to forget (negated); false: retained")


def _split(task: TensorTask[SplitUnlearnParams, SplitUnlearnModelParams]) -> tuple[torch.Tensor, torch.Tensor]:
    tvs = task.task_vectors()
    retain = [(tv, mp.weight) for tv, mp in zip(tvs, task.model_params) if not mp.forget]
    forget = [(tv, mp.weight) for tv, mp in zip(tvs, task.model_params) if mp.forget]
    zeros = torch.zeros_like(tvs[0])
    tau_r = weighted_total([t for t, _ in retain], [w for _, w in retain]) if retain else zeros
    tau_f = weighted_total([t for t, _ in forget], [w for _, w in forget]) if forget else zeros
    return tau_r, tau_f


def _projection_coefficient(blocks: TensorBlocks[SplitUnlearnParams, SplitUnlearnModelParams]) -> float:
    """<tau_f, tau_r> / <tau_r, tau_r> over the whole tensor (0 when not orthogonalizing)."""
    mps = blocks.model_params
    if not blocks.params.orthogonalize or all(mp.forget for mp in mps) or not any(mp.forget for mp in mps):
        return 0.0
    dot = 0.0
    norm = 0.0
    for block in blocks.blocks():
        tau_r, tau_f = _split(block)
        r64 = tau_r.to(torch.float64)
        dot += float((tau_f.to(torch.float64) * r64).sum())
        norm += float((r64 * r64).sum())
    return dot / norm if norm > 0 else 0.0


@strategy(
    "split_unlearn",
    params=SplitUnlearnParams,
    model_params=SplitUnlearnModelParams,
    base="required",
    prepare=_projection_coefficient,
    family="task-vector",
    paper="Kadhe et al. 2024, Split, Unlearn, Merge (arXiv:2406.11780); Ilharco et al. 2023 task negation",
)
def split_unlearn(task: TensorTask[SplitUnlearnParams, SplitUnlearnModelParams], coef: float) -> torch.Tensor:
    """Add retained task vectors, subtract forget ones (made orthogonal to the retained direction)."""
    assert task.base is not None
    tau_r, tau_f = _split(task)
    if coef:
        tau_f = tau_f - tau_r * coef
    return task.base + tau_r * lam(task.params) - tau_f * task.params.forget_lambda
