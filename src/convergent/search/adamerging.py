"""AdaMerging (Yang et al. 2023): merge coefficients learnt by entropy minimisation on unlabelled inputs.

The merged model is task arithmetic with learnt coefficients::

    theta = theta_base + sum_k lambda_{g,k} tau_k        tau_k = theta_k - theta_base

where ``g`` is the coefficient group of a tensor:

* ``task``: one coefficient per model (task-wise AdaMerging);
* ``layer``: one per model and numbered layer (``...layers.7...``); tensors
  outside numbered layers (embeddings, final norm, head) share one group;
* ``tensor``: one per model and parameter tensor (layer-wise AdaMerging as in
  the paper's code, where every parameter tensor has its own coefficient).

The coefficients start at ``init`` (0.3, the paper's value) and minimise the
Shannon entropy of the merged model's predictions on the user's unlabelled
examples with Adam (the paper uses lr 1e-3), evaluated through
``torch.func.functional_call`` so only the coefficients carry gradients. After
each step they are projected into ``bounds`` (the paper clamps to [0, 1]).
Entropy is that of the predicted distribution: per sequence for classifiers,
per (non-padding) position for causal LMs and per-token heads, averaged.
Minibatches are drawn with a generator seeded by ``seed``: same inputs, same
coefficients.

The result is written by the engine as a task_arithmetic merge with the learnt
per-tensor weights (see :mod:`convergent.search._taskvectors`), with
``recipe.yaml`` and ``adamerging.json`` (coefficients, entropies) beside it.

Limits: needs base and models in memory (about (models + 3) x the model in
float32) and a model with an output head (causal LM, classifier, masked LM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from convergent.engine.execute import layer_of
from convergent.errors import RecipeError
from convergent.search._taskvectors import TaskVectors, check_output, load_task_vectors, write_merge
from convergent.stats.data import DataError
from convergent.stats.hf import CLASSIFIER, NO_HEAD, batches, pad_id, tokenize

GRANULARITIES = ("task", "layer", "tensor")


def groups_of(names: Sequence[str], granularity: str) -> tuple[list[int], list[str]]:
    """Group index of each name, and the group labels."""
    if granularity == "task":
        return [0] * len(names), ["all"]
    labels: list[str] = []
    index: dict[str, int] = {}
    out = []
    for name in names:
        if granularity == "tensor":
            label = name
        else:
            layer = layer_of(name)
            label = "other" if layer is None else f"layer {layer}"
        if label not in index:
            index[label] = len(labels)
            labels.append(label)
        out.append(index[label])
    return out, labels


def prediction_entropy(logits: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits): per sequence for classifiers, per real token otherwise."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    if kind == CLASSIFIER or ent.dim() == 1:
        return ent.mean()
    m = mask.to(ent.dtype)
    return (ent * m).sum() / m.sum().clamp_min(1.0)


@dataclass
class AdaMergeResult:
    coefficients: dict[str, list[float]]  # group label -> one coefficient per model
    per_tensor: dict[str, list[float]]
    entropy_before: float
    entropy_after: float
    history: list[float]
    out_dir: Path | None

    def to_json(self) -> dict[str, Any]:
        return {
            "coefficients": self.coefficients,
            "entropy_before": self.entropy_before,
            "entropy_after": self.entropy_after,
            "history": self.history,
            "out_dir": str(self.out_dir) if self.out_dir else None,
        }


def _entropy_over(tv: TaskVectors, params: dict[str, torch.Tensor], data, kind: str) -> float:
    total = weight = 0.0
    with torch.no_grad():
        for input_ids, mask in data:
            logits = functional_call(tv.model, params, args=(), kwargs={"input_ids": input_ids, "attention_mask": mask})
            n = float(mask.shape[0]) if kind == CLASSIFIER else float(mask.sum())
            total += float(prediction_entropy(logits.logits, mask, kind)) * n
            weight += n
    return total / weight


def adamerge(
    base: str | Path,
    models: Sequence[str | Path],
    texts: Sequence[str],
    *,
    granularity: str = "layer",
    steps: int = 100,
    lr: float = 1e-3,
    init: float = 0.3,
    bounds: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 8,
    max_length: int = 128,
    max_samples: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    merge_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AdaMergeResult:
    """Learn AdaMerging coefficients on ``texts`` and (with ``out_dir``) write the merged model."""
    if granularity not in GRANULARITIES:
        raise RecipeError(f"unknown granularity '{granularity}'", f"use one of: {', '.join(GRANULARITIES)}")
    if steps < 0 or lr <= 0 or batch_size < 1 or bounds[0] > bounds[1]:
        raise RecipeError("AdaMerging needs steps >= 0, lr > 0, batch size >= 1 and low <= high bounds")
    check_output(out_dir, overwrite)
    if max_samples is not None:
        texts = list(texts)[:max_samples]
    tv = load_task_vectors(base, models)
    kind = tv.loaded.kind
    if kind == NO_HEAD:
        raise RecipeError(
            f"{base}: {tv.loaded.architecture} has no output head, so its predictions have no entropy",
            "AdaMerging needs a causal LM, a classifier or a masked LM",
        )
    ids = tokenize(tv.loaded.tokenizer, texts, max_length)
    if not ids:
        raise DataError("no examples to adapt on", "give a data file with at least one non-empty example")
    pad = pad_id(tv.loaded.tokenizer)
    group_of, labels = groups_of(tv.names, granularity)
    k = len(tv.vectors)
    lam = torch.full((len(labels), k), float(init), dtype=torch.float32)
    lam.clamp_(*bounds)
    lam.requires_grad_(True)
    optimizer = torch.optim.Adam([lam], lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def params_for(coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
        return tv.merged({n: coeffs[g] for n, g in zip(tv.names, group_of)})

    everything = list(batches(ids, batch_size, pad))
    before = _entropy_over(tv, params_for(lam.detach()), everything, kind)
    history = []
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(ids), generator=gen).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        input_ids, mask = next(batches([ids[i] for i in chosen], batch_size, pad))
        optimizer.zero_grad(set_to_none=True)
        out = functional_call(
            tv.model, params_for(lam), args=(), kwargs={"input_ids": input_ids, "attention_mask": mask}
        )
        loss = prediction_entropy(out.logits, mask, kind)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            lam.clamp_(*bounds)
        history.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps)
    final = lam.detach().clone()
    after = _entropy_over(tv, params_for(final), everything, kind)
    coefficients = {label: [float(v) for v in final[g]] for g, label in enumerate(labels)}
    per_tensor = {n: [float(v) for v in final[g]] for n, g in zip(tv.names, group_of)}
    result = AdaMergeResult(coefficients, per_tensor, before, after, history, Path(out_dir) if out_dir else None)
    if out_dir is not None:
        report = {
            "method": "ada_merging",
            "paper": "Yang et al. 2023, AdaMerging: Adaptive Model Merging for Multi-Task Learning (arXiv:2310.02575)",
            "granularity": granularity,
            "models": [str(p) for p in tv.model_dirs],
            "base": str(tv.base_dir),
            "steps": steps,
            "lr": lr,
            "init": init,
            "seed": seed,
            "examples": len(ids),
            **result.to_json(),
        }
        report.pop("out_dir")
        write_merge(
            tv,
            per_tensor,
            out_dir,
            report,
            "adamerging.json",
            task_wise=granularity == "task",
            overwrite=overwrite,
            merge_options=merge_options,
        )
    return result
