"""Karcher (Riemannian) mean of the models on the unit hypersphere, rescaled by their mean norm.

The iteration only ever forms linear combinations of the normalised inputs
(the mean, the tangent vectors, the exponential map), so it is carried out on
the coefficients of those combinations, using the Gram matrix of the inputs
computed once in a fixed block order. The element-wise part then streams in
row chunks: same bytes whole or chunked, memory independent of tensor size.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from convergent.strategies._geometry import blocked_gram, combine
from convergent.strategies.api import ModelParams, Params, TensorBlocks, TensorTask, strategy


class KarcherParams(Params):
    max_iter: int = Field(10, description="maximum number of Riemannian gradient steps")
    tol: float = Field(1e-5, description="convergence tolerance (on angles, norms and the gradient norm)")


def karcher_coefficients(g: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Float64 coefficients ``c`` with ``karcher(x) = sum_i c_i x_i`` from the Gram matrix of the ``x_i``.

    Equal weights. Inputs with norm <= ``tol`` take no part in the mean but
    still count in the final norm, which is the mean of all input norms.
    """
    k = g.shape[0]
    norms = torch.diagonal(g).clamp(min=0).sqrt()
    alpha = 1.0 / k
    valid = [i for i in range(k) if float(norms[i]) > tol]
    coefs = torch.zeros(k, dtype=torch.float64)
    if not valid:
        return coefs
    # Work in the basis of the valid unit vectors u_i = x_i / |x_i|.
    idx = torch.tensor(valid)
    unit_norms = norms[idx]
    ug = g[idx][:, idx] / (unit_norms[:, None] * unit_norms[None, :])
    m = len(valid)
    weights = torch.full((m,), 1.0 / m, dtype=torch.float64)

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(torch.dot(c, ug @ c)), 0.0))

    mean = weights.clone()
    mean_norm = norm(mean)
    if mean_norm < tol:
        mean = torch.zeros(m, dtype=torch.float64)
        mean[0] = 1.0
    else:
        mean = mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros(m, dtype=torch.float64)
        dots = ug @ mean
        for i in range(m):
            dot = min(1.0, max(-1.0, float(dots[i])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            direction = -dot * mean
            direction[i] += 1.0
            tangent = tangent + weights[i] * (theta / math.sin(theta)) * direction
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = float((norms * alpha).sum())
    coefs[idx] = scale * mean / unit_norms
    return coefs


def _prepare_karcher(blocks: TensorBlocks[KarcherParams, ModelParams]) -> list[torch.Tensor] | None:
    if len(blocks.model_params) < 2:
        return None
    g = blocked_gram(blocks, lambda task: task.models, "flat")
    coefs = karcher_coefficients(g, blocks.params.max_iter, blocks.params.tol)
    return [torch.tensor(float(c), dtype=torch.float32) for c in coefs]


@strategy(
    "karcher",
    params=KarcherParams,
    base="none",
    prepare=_prepare_karcher,
    min_models=1,
    paper="Karcher mean merging on the hypersphere (arXiv:2603.04972); Karcher 1977, Riemannian center of mass",
)
def karcher(task: TensorTask[KarcherParams, ModelParams], prepared: list[torch.Tensor] | None) -> torch.Tensor:
    """Weighted Karcher mean of the models' directions, scaled to their average norm."""
    if prepared is None:
        return task.models[0].clone()
    return combine(task.models, prepared)
