"""AdaRank (Lee et al. 2025): merge task vectors through pruned singular components.

AdaRank decomposes each task vector of a 2-D weight, ``tau_i = U_i S_i V_i^T``,
keeps a binary mask ``m_i`` over its singular components and merges::

    theta = origin + sum_i lambda_i U_i diag(m_i * s_i) V_i^T

The paper *learns* the masks (and the per-layer ``lambda_i``) at test time by
entropy minimisation on unlabelled inputs. This strategy has no data, so the
masks follow a fixed rule, applied per model and per tensor:

* keep the top-``k`` singular components, where ``k`` is the smallest count
  whose squared singular values reach the fraction ``energy`` of the task
  vector's total energy (``sum_{j<=k} s_j^2 >= energy * sum_j s_j^2``);
* and at most ``max(1, int(rank_ratio * min(d_out, d_in)))`` of them
  (the paper's ``initial_rank_ratio``).

``energy: 1`` and ``rank_ratio: 1`` keep everything (task arithmetic).
``origin: pretrained`` uses the base model and ``tau_i = theta_i - base`` (the
paper's TA variant, ``lambda`` 0.3); ``origin: average`` uses the weighted mean
of the models and ``tau_i = theta_i - mean`` (the CART variant, where the paper
uses ``rank_ratio`` 0.16 and ``lambda`` about 2.3). Tensors that are not 2-D
(biases, norms) add their full task vectors, as in the paper.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from convergent.strategies._negstat_common import is_matrix, lam, lambda_params, weighted_mean
from convergent.strategies.api import ModelParams, TensorTask, strategy

AdaRankBase = lambda_params("AdaRankBase", 0.3, "merging coefficient of every pruned task vector (the paper's prior)")


class AdaRankParams(AdaRankBase):  # type: ignore[valid-type,misc]
    """Parameters of ``adarank``."""

    energy: float = Field(
        0.95,
        gt=0,
        le=1,
        description="keep the fewest top singular components holding this fraction of the task vector's energy (s^2)",
    )
    rank_ratio: float = Field(
        1.0, gt=0, le=1, description="at most this fraction of min(d_out, d_in) components (initial_rank_ratio)"
    )
    origin: Literal["pretrained", "average"] = Field(
        "pretrained", description="pretrained: task vectors from the base (TA); average: from the models' mean (CART)"
    )


class AdaRankModelParams(ModelParams):
    weight: float = Field(1.0, description="multiplies lambda for this model (per-task merging coefficient)")


def kept_rank(s: torch.Tensor, energy: float, rank_ratio: float) -> int:
    """The number of leading singular components kept for singular values ``s`` (descending)."""
    full = s.numel()
    cap = max(1, int(rank_ratio * full))
    e = s.to(torch.float64) ** 2
    cum = torch.cumsum(e, 0)
    total = float(cum[-1]) if full else 0.0
    if total <= 0:
        return 0
    by_energy = int(torch.searchsorted(cum, torch.tensor([energy * total], dtype=torch.float64)).item()) + 1
    return min(cap, by_energy, full)


def prune(tau: torch.Tensor, energy: float, rank_ratio: float) -> torch.Tensor:
    """``tau`` rebuilt from its kept singular components."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    k = kept_rank(s, energy, rank_ratio)
    if k == s.numel():
        return tau
    return (u[:, :k] * s[:k]) @ vh[:k]


@strategy(
    "adarank",
    params=AdaRankParams,
    model_params=AdaRankModelParams,
    base="required",
    chunkable=False,
    family="task-vector",
    memory="whole tensor x (models + 5) plus the SVD workspace of one task vector",
    paper="Lee et al. 2025, AdaRank: Adaptive Rank Pruning for Enhanced Model Merging (arXiv:2503.22178)",
)
def adarank(task: TensorTask[AdaRankParams, AdaRankModelParams], _: None) -> torch.Tensor:
    """Task vectors merged through their leading singular components (energy/rank rule, no test-time adaptation)."""
    assert task.base is not None
    p = task.params
    if p.origin == "average":
        origin = weighted_mean(task.models, [1.0] * len(task.models), task.name, "adarank")
    else:
        origin = task.base
    out = origin.clone()
    for model, mp in zip(task.models, task.model_params):
        tau = model - origin
        if is_matrix(task.shape):
            tau = prune(tau, p.energy, p.rank_ratio)
        out = out + tau * (lam(p) * mp.weight)
    return out
