"""Continual merging by dual orthogonal projection (``dual_projection``).

Models arrive one after another (canonical order, or per-model ``order``).
Each new task vector is projected onto the orthogonal complement of the
subspace the previous tasks already occupy, on both sides of the weight
matrix, then added (the projection step of OPCM, Tang et al. 2025, and of the
dual-projection continual merging of Yuan et al. 2025, without their learned
or norm-based rescaling unless ``rescale`` is set)::

    M_1 = tau_1
    U, S, V = svd(M_{t-1});  r = rank holding the fraction alpha of sum(S)
    tau_t' = (I - U_r U_r^T) tau_t (I - V_r V_r^T)        (projection: both)
    M_t = M_{t-1} + tau_t'
    theta = base + lambda * M_n

``projection: left`` keeps only the output-side projector ``(I - U_r U_r^T)``,
``right`` only the input-side one. A new task vector whose row and column
spaces are orthogonal to the earlier ones passes unchanged. ``rescale`` sets
the norm of ``M_n`` to the mean Frobenius norm of the task vectors, per tensor
(OPCM does this over the whole model). Tensors that are not 2-D add their task
vectors unprojected.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from convergent.strategies._negstat_common import is_matrix, lam, lambda_params
from convergent.strategies.api import ModelParams, TensorTask, strategy

DualBase = lambda_params("DualBase", 1.0, "scaling coefficient of the merged (projected) task vector")


class DualProjectionParams(DualBase):  # type: ignore[valid-type,misc]
    """Parameters of ``dual_projection``."""

    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="protect the leading directions of earlier tasks holding this fraction of their singular values",
    )
    projection: Literal["both", "left", "right"] = Field(
        "both", description="project the output side (left), the input side (right), or both"
    )
    rescale: bool = Field(False, description="rescale the merged task vector to the mean task-vector norm (OPCM)")


class DualProjectionModelParams(ModelParams):
    order: int = Field(0, description="position of this model in the continual sequence; ties keep canonical order")


def protected_rank(s: torch.Tensor, alpha: float, shape: tuple[int, int]) -> int:
    """Leading singular directions protected: the fewest holding ``alpha`` of sum(s), ignoring ~0 values."""
    if alpha <= 0 or s.numel() == 0 or float(s[0]) <= 0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(s.dtype).eps
    nonzero = int((s > tol).sum())
    cum = torch.cumsum(s.to(torch.float64), 0)
    target = torch.tensor([alpha * float(cum[-1])], dtype=torch.float64)
    k = int(torch.searchsorted(cum, target).item()) + 1
    return min(k, nonzero)


def project_out(tau: torch.Tensor, merged: torch.Tensor, alpha: float, projection: str) -> torch.Tensor:
    """``tau`` without its components in the protected subspace of ``merged``."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    r = protected_rank(s, alpha, (merged.shape[0], merged.shape[1]))
    if r == 0:
        return tau
    if projection in ("both", "left"):
        ur = u[:, :r]
        tau = tau - ur @ (ur.T @ tau)
    if projection in ("both", "right"):
        vr = vh[:r].T
        tau = tau - (tau @ vr) @ vr.T
    return tau


@strategy(
    "dual_projection",
    params=DualProjectionParams,
    model_params=DualProjectionModelParams,
    base="required",
    chunkable=False,
    family="task-vector",
    memory="whole tensor x (models + 5) plus the SVD workspace of one task vector",
    paper="Tang et al. 2025, Merging Models on the Fly Without Retraining (OPCM, arXiv:2501.09522); "
    "Yuan et al. 2025, Continual Model Merging without Data: Dual Projections (NeurIPS 2025)",
)
def dual_projection(task: TensorTask[DualProjectionParams, DualProjectionModelParams], _: None) -> torch.Tensor:
    """Continual merge: each task vector projected off the earlier tasks' subspace, then added."""
    assert task.base is not None
    p = task.params
    tvs = task.task_vectors()
    order = sorted(range(len(tvs)), key=lambda i: (task.model_params[i].order, i))
    merged = tvs[order[0]].clone()
    for i in order[1:]:
        tau = tvs[i]
        if is_matrix(task.shape):
            tau = project_out(tau, merged, p.alpha, p.projection)
        merged = merged + tau
    if p.rescale:
        target = sum(float(torch.linalg.vector_norm(t.to(torch.float64))) for t in tvs) / len(tvs)
        current = float(torch.linalg.vector_norm(merged.to(torch.float64)))
        if current > 0:
            merged = merged * (target / current)
    return task.base + merged * lam(p)
