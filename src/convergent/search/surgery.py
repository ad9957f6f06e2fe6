"""Representation surgery (Yang et al. 2024, arXiv:2402.02705): a per-task module fixing merged representations.

A merged model's representation ``Z_merged`` (here: the input of the output
head, i.e. the final hidden state for LMs and the pooled feature for
classifiers) drifts from the individual fine-tuned model's ``Z_task``. For one
task, surgery fits a low-rank module on unlabelled inputs::

    Z_fixed = Z_merged - W_up ReLU(W_down Z_merged)        W_down: [r, d], W_up: [d, r]

minimising the L1 distance ``mean |Z_fixed - Z_task|`` with Adam (the
paper's objective and module; rank 16 by default). ``W_up`` starts at zero, so
the module starts as the identity and the distance can only improve on the
data it is fitted on. Only the module is trained; both models are frozen and
their representations are computed once (padding positions excluded).

The module is saved as a small ``.safetensors`` file (``down.weight``,
``up.weight``; metadata: ``kind=representation_surgery``, ``head`` module
name, rank, distances before/after). :func:`attach_surgery` applies it to a
loaded transformers model with a forward pre-hook on the head, so the merged
weights stay shared between tasks and each task adds ``2 r d`` parameters.

Limits: one representation (the head input); inputs are the user's texts
through the merged model's tokenizer (both models must share it); the
representations of all examples are held in memory (tokens x hidden x 2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convergent.errors import CheckpointError, RecipeError
from convergent.stats.compute import StatisticsError
from convergent.stats.data import DataError
from convergent.stats.hf import batches, load_model, pad_id, tokenize

KIND = "representation_surgery"
_HEAD_NAMES = ("classifier", "score", "classification_head", "lm_head", "cls", "head")


def head_module(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The output head whose input is the representation: (name, module)."""
    names = dict(model.named_modules())
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        for name, mod in names.items():
            if mod is head:
                return name, mod
    for name in _HEAD_NAMES:
        if name in names and name:
            return name, names[name]
    raise StatisticsError(
        f"{type(model).__name__}: no output head found (tried the output embeddings and {', '.join(_HEAD_NAMES)})",
        "representation surgery needs a model with a head (causal LM, classifier, masked LM)",
    )


class Surgery(torch.nn.Module):
    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = torch.nn.Linear(dim, rank, bias=False)
        self.up = torch.nn.Linear(rank, dim, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.up(torch.relu(self.down(z)))


def representations(model: torch.nn.Module, ids: Sequence[list[int]], batch_size: int, pad: int) -> torch.Tensor:
    """Head inputs [N, d] for every non-padding position (or every sequence for pooled heads)."""
    _, head = head_module(model)
    rows: list[torch.Tensor] = []
    current: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        mask = current["mask"]
        if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            rows.append(x[mask].detach().float())
        else:
            rows.append(x.reshape(-1, x.shape[-1]).detach().float())

    handle = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for input_ids, mask in batches(ids, batch_size, pad):
                current["mask"] = mask.bool()
                model(input_ids=input_ids, attention_mask=mask)
    finally:
        handle.remove()
    return torch.cat(rows)


@dataclass
class SurgeryResult:
    path: Path | None
    rank: int
    head: str
    l1_before: float
    l1_after: float
    rows: int
    history: list[float]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None,
            "rank": self.rank,
            "head": self.head,
            "l1_before": self.l1_before,
            "l1_after": self.l1_after,
            "rows": self.rows,
        }


def fit_surgery(
    merged: str | Path,
    task_model: str | Path,
    texts: Sequence[str],
    *,
    rank: int = 16,
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 8,
    max_length: int = 128,
    max_samples: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SurgeryResult:
    """Fit the surgery module of ``task_model`` for the ``merged`` model on ``texts``; save it to ``out``."""
    from convergent.stats.compute import Statistics, save_statistics

    if rank < 1 or steps < 0 or lr <= 0:
        raise RecipeError("surgery needs rank >= 1, steps >= 0 and lr > 0")
    if out is not None and Path(out).exists() and not overwrite:
        from convergent.errors import OutputError

        raise OutputError(f"{out} already exists", "choose another --out or pass --overwrite")
    if max_samples is not None:
        texts = list(texts)[:max_samples]
    merged_model = load_model(merged)
    task = load_model(task_model, tokenizer=False)
    ids = tokenize(merged_model.tokenizer, texts, max_length)
    if not ids:
        raise DataError("no examples to fit the surgery on")
    pad = pad_id(merged_model.tokenizer)
    head_name, _ = head_module(merged_model.model)
    z_merged = representations(merged_model.model, ids, batch_size, pad)
    z_task = representations(task.model, ids, batch_size, pad)
    if z_merged.shape != z_task.shape:
        raise CheckpointError(
            f"representations differ in shape: merged {list(z_merged.shape)}, task {list(z_task.shape)}",
            "the task model must have the merged model's architecture",
        )
    gen = torch.Generator().manual_seed(seed)
    module = Surgery(z_merged.shape[1], rank)
    with torch.no_grad():
        bound = 1.0 / z_merged.shape[1] ** 0.5
        module.down.weight.copy_(torch.empty_like(module.down.weight).uniform_(-bound, bound, generator=gen))
        module.up.weight.zero_()
    before = float((z_merged - z_task).abs().mean())
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    history = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = (module(z_merged) - z_task).abs().mean()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps)
    with torch.no_grad():
        after = float((module(z_merged) - z_task).abs().mean())
    result = SurgeryResult(Path(out) if out else None, rank, head_name, before, after, z_merged.shape[0], history)
    if out is not None:
        meta = {
            "format": "pt",
            "creator": "convergent",
            "kind": KIND,
            "head": head_name,
            "rank": str(rank),
            "l1_before": repr(before),
            "l1_after": repr(after),
            "rows": str(z_merged.shape[0]),
            "task_model": str(task_model),
            "merged_model": str(merged),
        }
        tensors = {"down.weight": module.down.weight.detach(), "up.weight": module.up.weight.detach()}
        save_statistics(Statistics(KIND, tensors, len(ids), z_merged.shape[0], meta), out, overwrite=overwrite)
    return result


def attach_surgery(model: torch.nn.Module, path: str | Path) -> torch.utils.hooks.RemovableHandle:
    """Apply a saved surgery module to ``model``'s head input; returns the hook handle (``.remove()`` undoes it)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != KIND:
            raise StatisticsError(f"{path} is not a representation-surgery file")
        down, up = f.get_tensor("down.weight"), f.get_tensor("up.weight")
    module = Surgery(down.shape[1], down.shape[0])
    with torch.no_grad():
        module.down.weight.copy_(down)
        module.up.weight.copy_(up)
    names = dict(model.named_modules())
    head = names.get(meta.get("head", ""))
    if head is None:
        raise StatisticsError(f"{path}: the model has no module '{meta.get('head')}' to attach the surgery to")

    def hook(_m: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (module(x.float()).to(x.dtype), *args[1:])

    return head.register_forward_pre_hook(hook)
