"""Task-vector merges in the singular-value domain: TSV, Iso-C, Iso-CTS, STAR, KnOTS.

Each needs the whole tensor (an SVD), so none streams: ``chunkable=False``,
with the working memory stated per strategy. SVDs run in float64 (LAPACK,
single-threaded under the engine, so repeatable bytes on one machine).

Matrices: a tensor with two or more dimensions is treated as the matrix
``shape[0] x prod(shape[1:])`` (conv kernels included). Vectors and scalars
(biases, norms) have no useful spectrum; they fall back to task arithmetic on
the *mean* task vector, ``base + lambda * mean_i tau_i``, which is what the
TSV and Iso reference implementations do (STAR's own rule also reduces to the
mean for a vector). KnOTS instead applies its inner merge (ties or linear) to
the raw vectors, as its reference code does for "other" parameters.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from convergent.strategies.api import ModelParams, TensorTask, strategy
from convergent.strategies.task_vector_common import (
    FAMILY,
    as_matrix,
    finish,
    is_matrix,
    lam,
    mean_of,
    polar,
    svd,
    task_vectors64,
    with_lambda,
)

_LAMBDA_DOC = "scaling of the merged task vector added to the base"


def _mean_fallback(task: TensorTask[Any, Any], tvs: list[torch.Tensor]) -> torch.Tensor:
    return finish(task, mean_of(tvs), lam(task.params))


# --------------------------------------------------------------------------- TSV


TsvParams = with_lambda("TsvParams", _LAMBDA_DOC)


def tsv_merge(mats: list[torch.Tensor]) -> torch.Tensor:
    """TSV-Merge of task matrices: per-task rank-k SVD, concatenate, orthogonalise.

    k = min(d_out, d_in) // T (at least 1). U = [U_1k ... U_Tk], S, V likewise;
    U and V are replaced by their orthogonal polar factors (decorrelating the
    tasks' singular vectors); result = polar(U) diag(S) polar(V).
    """
    rank = min(mats[0].shape)
    k = max(1, rank // len(mats))
    us, ss, vs = [], [], []
    for mat in mats:
        u, s, vh = svd(mat)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k])
    u_all = torch.cat(us, dim=1)
    v_all = torch.cat(vs, dim=0)
    return polar(u_all) @ torch.diag(torch.cat(ss)) @ polar(v_all)


@strategy(
    "tsv",
    params=TsvParams,
    base="required",
    chunkable=False,
    family=FAMILY,
    paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging (TSV-Merge, CVPR)",
    memory="whole tensor in float64 x (models + 4): one d_out x d_in SVD per model, two polar SVDs",
)
def tsv(task: TensorTask[Any, ModelParams], _: None) -> torch.Tensor:
    """TSV-Merge: low-rank per-task SVD, orthogonalised singular vectors; 1-D falls back to the mean."""
    tvs = task_vectors64(task)
    if not is_matrix(task.shape):
        return _mean_fallback(task, tvs)
    return finish(task, tsv_merge([as_matrix(t) for t in tvs]), lam(task.params))


# --------------------------------------------------------------------------- Iso-C / Iso-CTS


IsoCParams = with_lambda("IsoCParams", _LAMBDA_DOC)


def iso_c_merge(mats: list[torch.Tensor]) -> torch.Tensor:
    """Iso-C: the summed task matrix with its spectrum flattened to the mean singular value."""
    total = torch.zeros_like(mats[0])
    for mat in mats:
        total += mat
    u, s, vh = svd(total)
    return s.mean() * (u @ vh)


@strategy(
    "iso_c",
    params=IsoCParams,
    base="required",
    chunkable=False,
    family=FAMILY,
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces (Iso-C)",
    memory="whole tensor in float64 x (models + 4): one SVD of the d_out x d_in sum",
)
def iso_c(task: TensorTask[Any, ModelParams], _: None) -> torch.Tensor:
    """Iso-C: isotropic scaling of the spectrum of the summed task matrix; 1-D falls back to the mean."""
    tvs = task_vectors64(task)
    if not is_matrix(task.shape):
        return _mean_fallback(task, tvs)
    return finish(task, iso_c_merge([as_matrix(t) for t in tvs]), lam(task.params))


class IsoCtsParams(with_lambda("_IsoCtsBase", _LAMBDA_DOC)):
    common_space_fraction: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="fraction of the min(d_out, d_in) directions taken from the common (summed) subspace; "
        "the rest is split equally between the tasks' own subspaces",
    )


def iso_cts_split(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common directions, directions per task), as in the reference code."""
    common = int(rank * fraction)
    per_task = min(round((rank - common) / tasks), rank // tasks)
    return rank - per_task * tasks, per_task


def iso_cts_merge(mats: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Iso-CTS: top common directions of the sum + each task's top directions
    orthogonal to them, orthogonalised, with an isotropic (mean) spectrum."""
    total = torch.zeros_like(mats[0])
    for mat in mats:
        total += mat
    common, per_task = iso_cts_split(min(total.shape), len(mats), fraction)
    u, s, vh = svd(total)
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task:
        u_common = u[:, :common]
        for mat in mats:
            specific = mat - u_common @ (u_common.T @ mat)
            ut, st, vt = svd(specific)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vs.append(vt[:per_task])
    s_all = torch.cat(ss)
    return s_all.mean() * (polar(torch.cat(us, dim=1)) @ polar(torch.cat(vs, dim=0)))


@strategy(
    "iso_cts",
    params=IsoCtsParams,
    base="required",
    chunkable=False,
    family=FAMILY,
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces (Iso-CTS)",
    memory="whole tensor in float64 x (models + 5): an SVD of the sum, one per model, two polar SVDs",
)
def iso_cts(task: TensorTask[Any, ModelParams], _: None) -> torch.Tensor:
    """Iso-CTS: common + task-specific subspaces with an isotropic spectrum; 1-D falls back to the mean."""
    tvs = task_vectors64(task)
    if not is_matrix(task.shape):
        return _mean_fallback(task, tvs)
    merged = iso_cts_merge([as_matrix(t) for t in tvs], task.params.common_space_fraction)
    return finish(task, merged, lam(task.params))


# --------------------------------------------------------------------------- STAR


class StarParams(with_lambda("_StarBase", _LAMBDA_DOC)):
    eta: float = Field(
        40.0,
        gt=0.0,
        le=100.0,
        description="eta: percentage of each task matrix's nuclear norm the kept spectrum covers",
    )


def star_truncate(mat: torch.Tensor, eta: float) -> torch.Tensor:
    """STAR on one matrix: keep the fewest top singular values whose sum reaches
    eta % of the nuclear norm, rescale them to the full nuclear norm."""
    u, s, vh = svd(mat)
    total = s.sum()
    if float(total) == 0.0:
        return torch.zeros_like(mat)
    cumulative = torch.cumsum(s, dim=0)
    keep = int(torch.searchsorted(cumulative, total * (eta / 100.0))) + 1
    keep = min(keep, s.numel())
    kept = s[:keep] * (total / s[:keep].sum())
    return u[:, :keep] @ torch.diag(kept) @ vh[:keep]


@strategy(
    "star",
    params=StarParams,
    base="required",
    chunkable=False,
    family=FAMILY,
    paper="Lee et al. 2025, STAR: Spectral Truncation and Rescale for Model Merging (NAACL)",
    memory="whole tensor in float64 x (models + 3): one d_out x d_in SVD per model",
)
def star(task: TensorTask[Any, ModelParams], _: None) -> torch.Tensor:
    """STAR: per-task spectral truncation to eta % of the nuclear norm, rescaled, then averaged."""
    tvs = task_vectors64(task)
    if not is_matrix(task.shape):
        return _mean_fallback(task, tvs)
    truncated = [star_truncate(as_matrix(t), task.params.eta) for t in tvs]
    return finish(task, mean_of(truncated), lam(task.params))


# --------------------------------------------------------------------------- KnOTS

#: Components of the concatenated SVD with s <= s_max * this are dropped as numerically zero.
_KNOTS_RTOL = 1e-10


class KnotsParams(with_lambda("_KnotsBase", _LAMBDA_DOC)):
    merge: Literal["ties", "linear"] = Field(
        "ties",
        description="inner merge of the aligned task representations: ties (trim, elect, disjoint mean) or "
        "linear (sum, i.e. task arithmetic)",
    )
    density: float = Field(
        0.2, gt=0.0, le=1.0, description="ties only: fraction of each aligned representation kept by magnitude (topK)"
    )


def ties_merge(reps: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES on arbitrary equal-shape tensors: keep each one's top ``density`` by
    |value| (ties at the threshold kept), elect the sign of the sum, average the
    kept values that agree with it."""
    trimmed = []
    for rep in reps:
        magnitude = rep.abs()
        k = max(1, round(density * magnitude.numel()))
        if k < magnitude.numel():
            thr = torch.topk(magnitude.reshape(-1), k).values[-1]
            rep = torch.where(magnitude >= thr, rep, torch.zeros_like(rep))
        trimmed.append(rep)
    total = torch.zeros_like(reps[0])
    for t in trimmed:
        total += t
    elected = torch.sign(total)
    num = torch.zeros_like(reps[0])
    count = torch.zeros_like(reps[0])
    for t in trimmed:
        agree = (torch.sign(t) == elected) & (t != 0)
        num += torch.where(agree, t, 0.0)
        count += agree
    return num / count.clamp(min=1)


def _inner(reps: list[torch.Tensor], params: KnotsParams) -> torch.Tensor:
    if params.merge == "linear":
        total = torch.zeros_like(reps[0])
        for rep in reps:
            total += rep
        return total
    return ties_merge(reps, params.density)


def knots_merge(mats: list[torch.Tensor], params: KnotsParams) -> torch.Tensor:
    """KnOTS: [dW_1 ... dW_T] = U S [V_1^T ... V_T^T]; merge R_i = S V_i^T in
    the shared basis U with the inner method; dW = U R_merged."""
    d_in = mats[0].shape[1]
    u, s, vh = svd(torch.cat(mats, dim=1))
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros_like(mats[0])
    keep = s > s[0] * _KNOTS_RTOL
    u, s, vh = u[:, keep], s[keep], vh[keep]
    reps = [s[:, None] * vh[:, i * d_in : (i + 1) * d_in] for i in range(len(mats))]
    return u @ _inner(reps, params)


@strategy(
    "knots",
    params=KnotsParams,
    base="required",
    chunkable=False,
    family=FAMILY,
    paper="Stoica et al. 2025, Model merging with SVD to tie the KnOTS (ICLR, arXiv:2410.19735)",
    memory="whole tensor in float64 x (3 models + 3): SVD of the d_out x (models * d_in) concatenation",
)
def knots(task: TensorTask[KnotsParams, ModelParams], _: None) -> torch.Tensor:
    """KnOTS: align task updates in the SVD basis of their concatenation, merge there (ties/linear)."""
    tvs = task_vectors64(task)
    if not is_matrix(task.shape):
        return finish(task, _inner(tvs, task.params), lam(task.params))
    return finish(task, knots_merge([as_matrix(t) for t in tvs], task.params), lam(task.params))
