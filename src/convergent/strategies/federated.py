"""Federated aggregation: FedAvg and Byzantine-robust aggregators.

Each contribution is one client's model. All five aggregators are
translation-equivariant (aggregating updates ``model - base`` and adding the
base back gives the same point as aggregating the models), so none of them
takes a base model: pass the clients' models and get the aggregate.

Every method streams in row chunks. The elementwise ones (fedavg, median,
trimmed_mean) need nothing global. Krum, Multi-Krum and the geometric median
need distances between whole tensors: ``prepare`` accumulates all pairwise
squared distances in float64, block by block in a fixed order, and everything
else is done on that small ``n x n`` matrix:

* Krum/Multi-Krum pick models from the distance matrix; ``apply`` averages
  the picked ones.
* The geometric median is computed with Weiszfeld's algorithm on the
  coefficients ``c`` of ``z = sum_i c_i x_i`` (every Weiszfeld iterate is such
  an affine combination), using
  ``||x_i - z||^2 = sum_j c_j D_ij - 1/2 sum_jk c_j c_k D_jk``. ``apply`` only
  forms ``sum_i c_i x_i``. So even the iterative method reads each tensor
  twice, whatever its size.

**Granularity.** The engine merges tensor by tensor, so Krum and Multi-Krum
score and select *per tensor*: different tensors may keep different clients.
Blanchard et al. score the whole flattened update and select one client for the
whole model; per-tensor selection is a finer filter (a client poisoning one
layer only loses that layer) but it is not the paper's model-level rule. The
geometric median is likewise per tensor (RFA's is over the whole update).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from convergent.errors import MergeInputError
from convergent.strategies.api import ModelParams, Params, TensorBlocks, TensorTask, strategy

FAMILY = "federated"


def _stack(task: TensorTask[Any, Any]) -> torch.Tensor:
    return torch.stack([m.to(torch.float32) for m in task.models], dim=0)


def _weighted_sum(tensors: tuple[torch.Tensor, ...] | list[torch.Tensor], coeffs: list[float]) -> torch.Tensor:
    """sum_i c_i x_i accumulated in float64 in canonical order, rounded once."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for c, x in zip(coeffs, tensors):
        if c != 0.0:
            acc.add_(x.to(torch.float64), alpha=c)
    return acc.to(torch.float32)


# --------------------------------------------------------------------------- fedavg


class FedAvgModelParams(ModelParams):
    num_examples: int | None = Field(
        None, ge=0, description="n_k: number of local training examples of this client; weights are n_k / sum_j n_j"
    )
    weight: float = Field(1.0, ge=0, description="relative weight, used only when no model gives num_examples")


def fedavg_weights(task: TensorTask[Params, FedAvgModelParams]) -> list[float]:
    """Normalised aggregation weights p_k (sample counts, else plain weights)."""
    counts = [mp.num_examples for mp in task.model_params]
    if all(c is not None for c in counts):
        raw = [float(c) for c in counts]  # type: ignore[arg-type]
        what = "num_examples"
    elif all(c is None for c in counts):
        raw = [float(mp.weight) for mp in task.model_params]
        what = "weights"
    else:
        raise MergeInputError(
            f"fedavg on {task.name}: num_examples is given for some models but not all",
            "give num_examples for every model, or for none (then weight is used)",
        )
    total = math.fsum(raw)
    if total <= 0:
        raise MergeInputError(f"fedavg on {task.name}: the {what} sum to zero", "give at least one positive count")
    return [r / total for r in raw]


@strategy(
    "fedavg",
    model_params=FedAvgModelParams,
    base="none",
    family=FAMILY,
    paper="McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from Decentralized Data (FedAvg)",
)
def fedavg(task: TensorTask[Params, FedAvgModelParams], _: None) -> torch.Tensor:
    """Federated averaging: sum_k (n_k / n) w_k, weighted by local sample counts."""
    return _weighted_sum(task.models, fedavg_weights(task))


# --------------------------------------------------------------------------- median / trimmed mean


@strategy(
    "median",
    base="none",
    family=FAMILY,
    paper="Yin et al. 2018, Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates "
    "(coordinate-wise median)",
    memory="streams in row chunks; chunk x 2 x models (stack and sort)",
)
def median(task: TensorTask[Params, ModelParams], _: None) -> torch.Tensor:
    """Coordinate-wise median (mean of the two middle values for an even count)."""
    values = torch.sort(_stack(task), dim=0).values
    n = values.shape[0]
    if n % 2:
        return values[n // 2].clone()
    low = values[n // 2 - 1].to(torch.float64)
    high = values[n // 2].to(torch.float64)
    return ((low + high) * 0.5).to(torch.float32)


class TrimmedMeanParams(Params):
    beta: float = Field(
        0.1,
        ge=0.0,
        lt=0.5,
        description="beta: fraction of the values removed from each end per coordinate (floor(beta * n) each side)",
    )


def trim_count(beta: float, n: int) -> int:
    """floor(beta * n), robust to 0.29 * 100 = 28.999..."""
    return math.floor(beta * n + 1e-9)


@strategy(
    "trimmed_mean",
    params=TrimmedMeanParams,
    base="none",
    family=FAMILY,
    paper="Yin et al. 2018, Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates (trimmed mean)",
    memory="streams in row chunks; chunk x 2 x models (stack and sort)",
)
def trimmed_mean(task: TensorTask[TrimmedMeanParams, ModelParams], _: None) -> torch.Tensor:
    """Coordinate-wise beta-trimmed mean: drop the floor(beta n) largest and smallest, average the rest."""
    values = torch.sort(_stack(task), dim=0).values
    n = values.shape[0]
    k = trim_count(task.params.beta, n)
    kept = values[k : n - k].to(torch.float64)
    acc = torch.zeros(kept.shape[1:], dtype=torch.float64)
    for row in kept:  # fixed order
        acc += row
    return (acc / kept.shape[0]).to(torch.float32)


# --------------------------------------------------------------------------- pairwise distances


def pairwise_sq_distances(blocks: TensorBlocks[Any, Any]) -> list[list[float]]:
    """D[i][j] = ||x_i - x_j||^2 over the whole tensor (float64, blocks in order)."""
    n = len(blocks.model_params)
    dist = [[0.0] * n for _ in range(n)]
    for block in blocks.blocks():
        xs = [m.reshape(-1).to(torch.float64) for m in block.models]
        for i in range(n):
            for j in range(i + 1, n):
                diff = xs[i] - xs[j]
                d = float((diff * diff).sum())
                dist[i][j] += d
                dist[j][i] += d
    return dist


# --------------------------------------------------------------------------- krum / multi-krum


class KrumParams(Params):
    num_byzantine: int = Field(
        0, ge=0, description="f: number of Byzantine (arbitrary) models tolerated; needs n > 2f + 2 models"
    )


class MultiKrumParams(KrumParams):
    num_selected: int | None = Field(
        None, ge=1, description="m: number of lowest-score models averaged (None = n - f, as in Blanchard et al.)"
    )


def krum_scores(dist: list[list[float]], f: int, name: str) -> list[float]:
    """score(i) = sum of the squared distances from x_i to its n - f - 2 nearest others."""
    n = len(dist)
    if n <= 2 * f + 2:
        raise MergeInputError(
            f"krum on {name}: {n} models cannot tolerate num_byzantine={f} (needs n > 2f + 2)",
            f"use at least {2 * f + 3} models or lower num_byzantine",
        )
    near = n - f - 2
    scores = []
    for i in range(n):
        others = sorted(dist[i][j] for j in range(n) if j != i)
        scores.append(math.fsum(others[:near]))
    return scores


def _select(blocks: TensorBlocks[Any, Any], count: int | None) -> list[int]:
    n = len(blocks.model_params)
    f = blocks.params.num_byzantine
    scores = krum_scores(pairwise_sq_distances(blocks), f, blocks.name)
    m = n - f if count is None else count
    if not 1 <= m <= n:
        raise MergeInputError(
            f"multi_krum on {blocks.name}: num_selected={m} is outside 1..{n}",
            "choose num_selected <= number of models",
        )
    ranked = sorted(range(n), key=lambda i: (scores[i], i))  # ties go to the first in canonical order
    return sorted(ranked[:m])


def _prepare_krum(blocks: TensorBlocks[KrumParams, ModelParams]) -> list[int]:
    return _select(blocks, 1)


def _prepare_multi_krum(blocks: TensorBlocks[MultiKrumParams, ModelParams]) -> list[int]:
    return _select(blocks, blocks.params.num_selected)


def _average_selected(task: TensorTask[Any, Any], selected: list[int]) -> torch.Tensor:
    coeffs = [0.0] * len(task.models)
    for i in selected:
        coeffs[i] = 1.0 / len(selected)
    return _weighted_sum(task.models, coeffs)


@strategy(
    "krum",
    params=KrumParams,
    base="none",
    prepare=_prepare_krum,
    family=FAMILY,
    paper="Blanchard et al. 2017, Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent (Krum)",
    memory="streams in row chunks; prepare holds one block of every model in float64",
)
def krum(task: TensorTask[KrumParams, ModelParams], selected: list[int]) -> torch.Tensor:
    """Krum: the model whose n - f - 2 nearest neighbours are closest (selected per tensor)."""
    return _average_selected(task, selected)


@strategy(
    "multi_krum",
    params=MultiKrumParams,
    base="none",
    prepare=_prepare_multi_krum,
    family=FAMILY,
    paper="Blanchard et al. 2017, Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent (Multi-Krum)",
    memory="streams in row chunks; prepare holds one block of every model in float64",
)
def multi_krum(task: TensorTask[MultiKrumParams, ModelParams], selected: list[int]) -> torch.Tensor:
    """Multi-Krum: the mean of the m models with the lowest Krum scores (selected per tensor)."""
    return _average_selected(task, selected)


# --------------------------------------------------------------------------- geometric median


class GeometricMedianParams(Params):
    eps: float = Field(
        1e-6, gt=0, description="nu: smoothing; distances below eps count as eps (RFA's smoothed Weiszfeld)"
    )
    max_iter: int = Field(
        500, ge=1, description="maximum number of Weiszfeld iterations (cheap: they run on the n x n distances)"
    )
    tol: float = Field(
        1e-10, ge=0, description="stop when the objective sum_i a_i ||x_i - z|| changes by at most tol x its value"
    )


class GeometricMedianModelParams(ModelParams):
    weight: float = Field(1.0, ge=0, description="alpha_i: weight of this model (e.g. its number of examples)")


def weiszfeld_coefficients(
    dist: list[list[float]], weights: list[float], eps: float, max_iter: int, tol: float
) -> list[float]:
    """Coefficients c (sum 1) of the smoothed-Weiszfeld geometric median z = sum_i c_i x_i."""
    d = torch.tensor(dist, dtype=torch.float64)
    a = torch.tensor(weights, dtype=torch.float64)
    a = a / a.sum()

    def distances(c: torch.Tensor) -> torch.Tensor:
        dc = (d * c).sum(dim=1)  # sum_j c_j D_ij
        sq = dc - 0.5 * (c * dc).sum()
        return sq.clamp(min=0.0).sqrt()

    c = a.clone()  # start at the weighted mean
    dist_c = distances(c)
    objective = float((a * dist_c).sum())
    for _ in range(max_iter):
        beta = a / dist_c.clamp(min=eps)
        c = beta / beta.sum()
        dist_c = distances(c)
        new_objective = float((a * dist_c).sum())
        done = abs(objective - new_objective) <= tol * new_objective
        objective = new_objective
        if done:
            break
    return [float(x) for x in c]


def _prepare_geometric_median(blocks: TensorBlocks[GeometricMedianParams, GeometricMedianModelParams]) -> list[float]:
    weights = [mp.weight for mp in blocks.model_params]
    if math.fsum(weights) <= 0:
        raise MergeInputError(f"geometric_median on {blocks.name}: weights sum to zero", "give positive weights")
    p = blocks.params
    return weiszfeld_coefficients(pairwise_sq_distances(blocks), weights, p.eps, p.max_iter, p.tol)


@strategy(
    "geometric_median",
    params=GeometricMedianParams,
    model_params=GeometricMedianModelParams,
    base="none",
    prepare=_prepare_geometric_median,
    family=FAMILY,
    paper="Pillutla et al. 2022, Robust Aggregation for Federated Learning (RFA, smoothed Weiszfeld)",
    memory="streams in row chunks; prepare holds one block of every model in float64",
)
def geometric_median(
    task: TensorTask[GeometricMedianParams, GeometricMedianModelParams], coeffs: list[float]
) -> torch.Tensor:
    """Weighted geometric median by smoothed Weiszfeld iterations (RFA), per tensor."""
    return _weighted_sum(task.models, coeffs)
