"""Spherical interpolation: slerp, nuslerp and multislerp (mergekit's geometric family).

All three reduce to ``sum_i c_i * x_i`` where the coefficients ``c_i`` depend
only on inner products between the inputs. Those inner products are computed
first, in float64 and in a fixed block order (see ``_geometry``), so the
element-wise part streams in row chunks and gives the same bytes whole or
chunked. nuslerp's per-row mode needs only row-local statistics and computes
them as it goes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from convergent.errors import MergeInputError
from convergent.strategies._geometry import (
    Layout,
    blocked_gram,
    by_grid_blocks,
    combine,
    effective_layout,
    gram,
)
from convergent.strategies.api import ModelParams, Params, TensorBlocks, TensorTask, strategy

MERGEKIT = "Goddard et al. 2024, Arcee's MergeKit (arXiv:2403.13257)"


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _count(task: TensorTask | TensorBlocks, models: int, method: str, got: int) -> None:
    if got != models:
        raise MergeInputError(
            f"{method} merges exactly {models} model(s) besides the base; got {got} for tensor {task.name}",
            "list the right number of models in the recipe",
        )


# ---------------------------------------------------------------------- slerp


class SlerpParams(Params):
    t: float = Field(description="interpolation factor: 0 gives the base model, 1 the other model")


def slerp_coefficients(
    t: float, aa: float, bb: float, ab: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[float, float]:
    """Coefficients ``(c_a, c_b)`` with ``slerp(a, b) = c_a a + c_b b`` from ``|a|^2, |b|^2, <a, b>``.

    Norms at or below ``eps`` count as 1 (so zero vectors stay finite); when the
    normalised dot product exceeds ``dot_threshold`` in magnitude the vectors
    are (anti)parallel and plain linear interpolation is used.
    """
    na = math.sqrt(max(aa, 0.0))
    nb = math.sqrt(max(bb, 0.0))
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = min(1.0, max(-1.0, ab / (na * nb)))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def _prepare_slerp(blocks: TensorBlocks[SlerpParams, ModelParams]) -> tuple[torch.Tensor, torch.Tensor]:
    def vectors(task: TensorTask) -> list[torch.Tensor]:
        if task.base is None:
            raise MergeInputError(f"slerp needs a base model (tensor {task.name})", "set base_model in the recipe")
        _count(task, 1, "slerp", len(task.models))
        return [task.base, task.models[0]]

    g = blocked_gram(blocks, vectors, "flat")
    ca, cb = slerp_coefficients(blocks.params.t, float(g[0, 0]), float(g[1, 1]), float(g[0, 1]))
    return _f32(ca), _f32(cb)


@strategy(
    "slerp",
    params=SlerpParams,
    base="required",
    prepare=_prepare_slerp,
    min_models=1,
    max_models=1,
    paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH '85); as in mergekit (arXiv:2403.13257)",
)
def slerp(task: TensorTask[SlerpParams, ModelParams], prepared: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Spherical linear interpolation between the base model and one other model."""
    assert task.base is not None
    return combine([task.base, task.models[0]], prepared)


# -------------------------------------------------------------------- nuslerp


class NuSlerpParams(Params):
    nuslerp_row_wise: bool = Field(
        False, description="interpolate column vectors (along dim 0) instead of rows; ignored when flattening"
    )
    nuslerp_flatten: bool = Field(True, description="interpolate the whole tensor as one vector")


class WeightModelParams(ModelParams):
    weight: float = Field(1.0, description="relative weight of this model")


def nuslerp_coefficients(
    t: float, aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 coefficients of nuslerp for float64 statistics of any shape.

    Norms are clamped at 1e-7; pairs whose cosine is +-1 in float32 (the
    precision mergekit decides in) interpolate linearly.
    """
    n0 = aa.clamp(min=0).sqrt().clamp(min=1e-7)
    n1 = bb.clamp(min=0).sqrt().clamp(min=1e-7)
    cos = (ab / (n0 * n1)).clamp(-1, 1)
    c32 = cos.to(torch.float32)
    colinear = (1 - c32.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    ca = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    return ca.to(torch.float32), cb.to(torch.float32)


def _nuslerp_t(task: TensorTask | TensorBlocks) -> float:
    weights = [mp.weight for mp in task.model_params]
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _nuslerp_layout(params: NuSlerpParams, shape: tuple[int, ...]) -> Layout:
    if params.nuslerp_flatten:
        return "flat"
    return effective_layout("first" if params.nuslerp_row_wise else "last", shape)


def _nuslerp_vectors(task: TensorTask) -> list[torch.Tensor]:
    _count(task, 2, "nuslerp", len(task.models))
    if task.base is None:
        return list(task.models)
    return [m - task.base for m in task.models]


def _prepare_nuslerp(blocks: TensorBlocks[NuSlerpParams, WeightModelParams]):
    _count(blocks, 2, "nuslerp", len(blocks.model_params))
    layout = _nuslerp_layout(blocks.params, blocks.shape)
    if layout == "last":
        return None
    g = blocked_gram(blocks, _nuslerp_vectors, layout)
    return nuslerp_coefficients(_nuslerp_t(blocks), g[..., 0, 0], g[..., 1, 1], g[..., 0, 1])


@strategy(
    "nuslerp",
    params=NuSlerpParams,
    model_params=WeightModelParams,
    base="optional",
    prepare=_prepare_nuslerp,
    min_models=2,
    max_models=2,
    paper=f"mergekit NuSLERP, after Shoemake 1985; {MERGEKIT}",
)
def nuslerp(
    task: TensorTask[NuSlerpParams, WeightModelParams], prepared: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """Slerp between two models (or their task vectors) with weights, whole, per row or per column."""
    vectors = _nuslerp_vectors(task)
    if prepared is not None:
        out = combine(vectors, prepared)
    else:
        t = _nuslerp_t(task)

        def rows(sl: slice) -> torch.Tensor:
            part = [v[sl] for v in vectors]
            g = gram(part, "last")
            ca, cb = nuslerp_coefficients(t, g[..., 0, 0], g[..., 1, 1], g[..., 0, 1])
            return combine(part, [ca.unsqueeze(-1), cb.unsqueeze(-1)])

        out = by_grid_blocks(task, rows)
    return out if task.base is None else task.base + out


# ----------------------------------------------------------------- multislerp


class MultiSlerpParams(Params):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, description="small constant for numerical stability")


def multislerp_coefficients(
    g: torch.Tensor, weights: Sequence[float], normalize: bool, eps: float, name: str = "tensor"
) -> torch.Tensor:
    """Float64 coefficients ``c`` with ``multislerp = sum_i c_i x_i`` from the Gram matrix of the ``x_i``.

    Barycentric interpolation on the hypersphere: project the unit vectors to
    the tangent space at their normalised weighted mean, average there, map
    back with the exponential map and rescale by the weighted mean norm. Every
    step is linear in the inputs, so it runs on coefficients.
    """
    w = torch.tensor(list(weights), dtype=torch.float64)
    if normalize:
        total = w.sum()
        if float(total) == 0.0:
            raise MergeInputError(
                f"multislerp weights sum to zero for tensor {name}", "give weights with a non-zero sum"
            )
        w = w / total
    norms = torch.diagonal(g).clamp(min=0).sqrt()
    inv = 1 / (norms + eps)
    mean = w * inv
    mean_norm = float(torch.dot(mean, g @ mean).clamp(min=0).sqrt())
    if mean_norm < eps:
        if len(w) == 2:
            return w
        raise MergeInputError(
            f"multislerp: the weighted mean of the normalised inputs is zero for tensor {name}",
            "antipodal inputs with balancing weights cannot be interpolated; change the weights",
        )
    unit_mean = mean / mean_norm
    dots = inv * (g @ unit_mean)
    tangent = mean - (w * dots).sum() * unit_mean
    tangent_norm = float(torch.dot(tangent, g @ tangent).clamp(min=0).sqrt()) + eps
    result = unit_mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    return result * (norms * w).sum()


def _multislerp_vectors(task: TensorTask) -> list[torch.Tensor]:
    if task.base is None:
        return list(task.models)
    return [m - task.base for m in task.models]


def _prepare_multislerp(blocks: TensorBlocks[MultiSlerpParams, WeightModelParams]) -> list[torch.Tensor] | None:
    if len(blocks.model_params) < 2:
        return None
    g = blocked_gram(blocks, _multislerp_vectors, "flat")
    p = blocks.params
    coefs = multislerp_coefficients(
        g, [mp.weight for mp in blocks.model_params], p.normalize_weights, p.eps, blocks.name
    )
    return [_f32(float(c)) for c in coefs]


@strategy(
    "multislerp",
    params=MultiSlerpParams,
    model_params=WeightModelParams,
    base="optional",
    prepare=_prepare_multislerp,
    min_models=1,
    paper=f"Goddard 2025, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); {MERGEKIT}",
)
def multislerp(
    task: TensorTask[MultiSlerpParams, WeightModelParams], prepared: list[torch.Tensor] | None
) -> torch.Tensor:
    """Barycentric interpolation of any number of models (or task vectors) on the hypersphere."""
    if prepared is None:
        if len(task.models) != 1:
            raise MergeInputError(f"multislerp needs at least one model (tensor {task.name})")
        return task.models[0].clone()
    out = combine(_multislerp_vectors(task), prepared)
    return out if task.base is None else out + task.base
