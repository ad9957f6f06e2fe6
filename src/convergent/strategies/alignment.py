"""Weight Scope Alignment (Xu et al. 2024), applied post hoc per tensor.

WSA observes that the weights of a layer are roughly Gaussian, with a *scope*
(mean mu, standard deviation sigma) that differs between independently
trained models and hurts averaging. The paper aligns scopes during training (a
KL regulariser towards a target scope) and fuses several models' scopes into
one target. Without training, this strategy aligns the finished tensors::

    mu~ = sum_i w_i mu_i / sum_i w_i,   sigma~ = sum_i w_i sigma_i / sum_i w_i   (scope fusion)
    x_i' = (x_i - mu_i) * sigma~ / sigma_i + mu~
    merged = sum_i w_i x_i' / sum_i w_i

where ``x_i`` is the task vector ``theta_i - base`` when a base model is given
(result ``base + lambda * merged``) and the weight itself otherwise (result
``merged``, the paper's federated/mode-connectivity setting). A model whose
tensor is constant (sigma_i = 0) contributes the target mean. Scopes are
whole-tensor statistics computed block by block in ``prepare`` (float64, two
passes: mean, then centred second moment), so the strategy streams in chunks.
"""

from __future__ import annotations

import torch
from pydantic import Field

from convergent.errors import MergeInputError
from convergent.strategies._negstat_common import lam, lambda_params
from convergent.strategies.api import ModelParams, TensorBlocks, TensorTask, strategy

WsaBase = lambda_params("WsaBase", 1.0, "scaling coefficient of the merged, aligned task vector (with a base model)")


class WsaParams(WsaBase):  # type: ignore[valid-type,misc]
    """Parameters of ``weight_scope_alignment``."""


class WsaModelParams(ModelParams):
    weight: float = Field(1.0, ge=0, description="weight of this model in the scope fusion and in the average")


def _inputs(task: TensorTask[WsaParams, WsaModelParams]) -> list[torch.Tensor]:
    return task.task_vectors() if task.base is not None else list(task.models)


def _scopes(blocks: TensorBlocks[WsaParams, WsaModelParams]) -> tuple[list[float], list[float], float, float]:
    """Per-model (mu_i, sigma_i) and the fused target (mu~, sigma~)."""
    n = len(blocks.model_params)
    weights = [mp.weight for mp in blocks.model_params]
    if sum(weights) == 0:
        raise MergeInputError(
            f"weight_scope_alignment: model weights sum to zero for tensor {blocks.name}", "give non-zero weights"
        )
    count = blocks.numel
    sums = [0.0] * n
    for block in blocks.blocks():
        for i, x in enumerate(_inputs(block)):
            sums[i] += float(x.to(torch.float64).sum())
    mus = [s / count for s in sums]
    sq = [0.0] * n
    for block in blocks.blocks():
        for i, x in enumerate(_inputs(block)):
            sq[i] += float(((x.to(torch.float64) - mus[i]) ** 2).sum())
    sigmas = [(v / count) ** 0.5 for v in sq]
    total = sum(weights)
    mu_t = sum(w * m for w, m in zip(weights, mus)) / total
    sigma_t = sum(w * s for w, s in zip(weights, sigmas)) / total
    return mus, sigmas, mu_t, sigma_t


@strategy(
    "weight_scope_alignment",
    params=WsaParams,
    model_params=WsaModelParams,
    base="optional",
    prepare=_scopes,
    family="task-vector",
    paper="Xu et al. 2024, Weight Scope Alignment: A Frustratingly Easy Method for Model Merging (arXiv:2408.12237)",
)
def weight_scope_alignment(
    task: TensorTask[WsaParams, WsaModelParams], scopes: tuple[list[float], list[float], float, float]
) -> torch.Tensor:
    """Standardise each model's tensor (or task vector) to the fused scope, then average."""
    mus, sigmas, mu_t, sigma_t = scopes
    weights = [mp.weight for mp in task.model_params]
    out = torch.zeros_like(task.models[0])
    for i, x in enumerate(_inputs(task)):
        scale = sigma_t / sigmas[i] if sigmas[i] > 0 else 0.0
        aligned = (x - mus[i]) * scale + mu_t
        out = out + aligned * float(weights[i])
    out = out / float(sum(weights))
    if task.base is None:
        return out
    return task.base + out * lam(task.params)
