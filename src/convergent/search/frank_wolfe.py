"""FW-Merging (Chen et al. 2025): Frank-Wolfe over the task vectors, driven by the gradient of a user objective.

Merging is the constrained problem ``min_theta L(theta)`` over merges of the
fine-tuned checkpoints. With task vectors ``tau_k = theta_k - theta_base``
and ``theta = theta_base + delta``, each iteration ``t``:

1. **relevance**: compute ``g = grad L(theta_t)`` by autograd through the
   model (the user's differentiable loss, or the language-model loss on
   ``texts``);
2. **linear minimisation oracle**: per tensor (``granularity="tensor"``, the
   paper's layer-wise selection) or for the whole model (``"model"``), pick
   the task vector most aligned against the gradient,
   ``k* = argmin_k cos(g, tau_k)`` (``oracle="cosine"``, as in the paper's
   code) or ``argmin_k <g, tau_k>`` (``oracle="inner"``, the textbook LMO).
   The vertex is ``s = scaling * tau_k*`` when that alignment is negative,
   otherwise ``s = 0`` (the base: no checkpoint helps); the constraint set is
   the convex hull of ``{0, scaling * tau_1, ..., scaling * tau_K}``;
3. **Frank-Wolfe step**: ``delta <- delta + gamma_t (s - delta)`` with
   ``gamma_t = min(1, step_size * 2 / (t + 2))``.

``delta`` is always ``sum_k c_k tau_k``; the coefficients ``c`` (per tensor)
are what is tracked, saved and finally written by the engine as a
task_arithmetic merge (``recipe.yaml`` and ``frank_wolfe.json`` beside the
weights). The Frank-Wolfe gap ``<g, delta - s>`` (>= 0, 0 at a stationary
point) is recorded every iteration, and the search stops early when the
gradient vanishes.

The loss is ``loss(model) -> scalar tensor``: a callable receiving the
transformers model (eval mode) whose parameters hold the current merge, e.g.
``lambda m: m(**batch, labels=batch["input_ids"]).loss``. Each call runs under
``torch.random.fork_rng`` seeded from ``(seed, iteration)``, so a loss that
samples is reproducible.

**Resumable**: with ``state_path`` the coefficients and history are saved
after every iteration; running again continues from the last completed
iteration and gives the same result as an uninterrupted run.

**Limits** (this version): a differentiable loss on a model that fits in
memory (base, K task vectors, the model and its gradients in float32:
about (K + 3) x model size); one gradient per iteration (no data sampling
of its own); FW-Soft (merging the selected checkpoints with another method,
e.g. AdaMerging, inside the step) is not implemented: the step is a plain
Frank-Wolfe convex combination.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convergent.errors import RecipeError
from convergent.search._taskvectors import TaskVectors, check_output, load_task_vectors, write_merge
from convergent.search.coefficients import SearchError, _write_json
from convergent.stats.data import DataError
from convergent.stats.hf import CAUSAL_LM, batches, pad_id, tokenize

LossFn = Callable[[torch.nn.Module], torch.Tensor]
GRANULARITIES = ("tensor", "model")
ORACLES = ("cosine", "inner")
INITS = ("base", "average")
STATE_VERSION = 1


@dataclass
class FrankWolfeResult:
    coefficients: dict[str, list[float]]
    history: list[dict[str, Any]]
    initial_loss: float
    final_loss: float
    iterations: int
    out_dir: Path | None = None
    selections: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "iterations": self.iterations,
            "history": self.history,
            "selections": self.selections,
            "out_dir": str(self.out_dir) if self.out_dir else None,
        }


def lm_loss(texts: Sequence[str], tokenizer: Any, max_length: int = 128, batch_size: int = 8) -> LossFn:
    """Mean next-token cross-entropy over ``texts`` (padding excluded), for causal LMs."""
    ids = [x for x in tokenize(tokenizer, texts, max_length) if len(x) >= 2]
    if not ids:
        raise DataError("no example has the 2 tokens a language-model loss needs")
    data = list(batches(ids, batch_size, pad_id(tokenizer)))
    total = sum(int(m[:, 1:].sum()) for _, m in data)

    def loss(model: torch.nn.Module) -> torch.Tensor:
        out = torch.zeros(())
        for input_ids, mask in data:
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1), reduction="none"
            )
            out = out + (nll * mask[:, 1:].reshape(-1)).sum()
        return out / total

    return loss


def _load_params(tv: TaskVectors, coefficients: dict[str, list[float]]) -> None:
    merged = tv.merged(coefficients)
    params = dict(tv.model.named_parameters())
    with torch.no_grad():
        for name in tv.names:
            params[name].copy_(merged[name])


def _loss_and_grad(tv: TaskVectors, loss_fn: LossFn, seed: int, iteration: int, grad: bool):
    params = dict(tv.model.named_parameters())
    for name in tv.names:
        params[name].requires_grad_(grad)
        params[name].grad = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + iteration)
        with torch.set_grad_enabled(grad):
            loss = loss_fn(tv.model)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise RecipeError("the Frank-Wolfe loss must return a scalar tensor", "return e.g. model(...).loss")
            if grad:
                if not loss.requires_grad:
                    raise RecipeError("the Frank-Wolfe loss does not depend on the model's parameters")
                loss.backward()
    value = float(loss.detach())
    grads = {}
    if grad:
        for name in tv.names:
            g = params[name].grad
            grads[name] = torch.zeros_like(params[name]) if g is None else g.detach().clone()
            params[name].requires_grad_(False)
            params[name].grad = None
    return value, grads


def frank_wolfe_merge(
    base: str | Path,
    models: Sequence[str | Path],
    loss: LossFn | None = None,
    texts: Sequence[str] | None = None,
    *,
    iterations: int = 10,
    step_size: float = 1.0,
    scaling: float = 1.0,
    granularity: str = "tensor",
    oracle: str = "cosine",
    init: str = "base",
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 8,
    state_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    merge_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FrankWolfeResult:
    """Run FW-Merging (see the module doc); with ``out_dir`` write the merged model."""
    if granularity not in GRANULARITIES:
        raise RecipeError(f"unknown granularity '{granularity}'", f"use one of: {', '.join(GRANULARITIES)}")
    if oracle not in ORACLES:
        raise RecipeError(f"unknown oracle '{oracle}'", f"use one of: {', '.join(ORACLES)}")
    if init not in INITS:
        raise RecipeError(f"unknown init '{init}'", f"use one of: {', '.join(INITS)}")
    if iterations < 0 or step_size <= 0:
        raise RecipeError("Frank-Wolfe needs iterations >= 0 and step size > 0")
    if (loss is None) == (texts is None):
        raise RecipeError("give exactly one of a loss function (--loss module:function) or data (--data FILE)")
    check_output(out_dir, overwrite)
    tv = load_task_vectors(base, models)
    if loss is None:
        if tv.loaded.kind != CAUSAL_LM:
            raise RecipeError(
                f"--data gives a language-model loss, but {tv.loaded.architecture} is not a causal LM",
                "pass your own differentiable loss with --loss module:function",
            )
        loss = lm_loss(texts or [], tv.loaded.tokenizer, max_length, batch_size)
    k = len(tv.vectors)
    start = 1.0 / k if init == "average" else 0.0
    coefficients = {n: [start] * k for n in tv.names}
    history: list[dict[str, Any]] = []
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                str(tv.base_dir.resolve()),
                [str(p.resolve()) for p in tv.model_dirs],
                step_size,
                scaling,
                granularity,
                oracle,
                init,
                seed,
            ],
        ).encode()
    ).hexdigest()
    path = Path(state_path) if state_path is not None else None
    initial_loss = None
    if path is not None and path.exists():
        state = json.loads(path.read_text())
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
            raise SearchError(
                f"state file {path} belongs to a different Frank-Wolfe merge",
                "use another --state file, or delete this one to start afresh",
            )
        coefficients = {n: [float(v) for v in state["coefficients"][n]] for n in tv.names}
        history = state["history"]
        initial_loss = state.get("initial_loss")
    converged = bool(history) and history[-1].get("converged", False)

    def save() -> None:
        if path is not None:
            state = {
                "version": STATE_VERSION,
                "fingerprint": fingerprint,
                "coefficients": coefficients,
                "history": history,
                "initial_loss": initial_loss,
            }
            _write_json(path, state)

    t = len(history)
    while t < iterations and not converged:
        _load_params(tv, coefficients)
        value, grads = _loss_and_grad(tv, loss, seed, t, grad=True)
        if initial_loss is None:
            initial_loss = value
        # <g, tau_k> per tensor, and the norms for the cosine oracle.
        dots = {n: [float((grads[n].double() * vec[n].double()).sum()) for vec in tv.vectors] for n in tv.names}
        g_norm = {n: float(grads[n].double().norm()) for n in tv.names}
        v_norm = {n: [float(vec[n].double().norm()) for vec in tv.vectors] for n in tv.names}
        total_g = sum(x * x for x in g_norm.values()) ** 0.5
        if total_g == 0.0:
            history.append({"iteration": t, "loss": value, "gap": 0.0, "step": 0.0, "converged": True})
            converged = True
            save()
            break
        vertex: dict[str, int | None] = {}
        if granularity == "tensor":
            for n in tv.names:
                align = [
                    (d / (g_norm[n] * vn) if g_norm[n] > 0 and vn > 0 else 0.0) if oracle == "cosine" else d
                    for d, vn in zip(dots[n], v_norm[n])
                ]
                best = min(range(k), key=lambda i, a=align: (a[i], i))
                vertex[n] = best if align[best] < 0 else None
        else:
            whole = [sum(dots[n][i] for n in tv.names) for i in range(k)]
            norms = [sum(v_norm[n][i] ** 2 for n in tv.names) ** 0.5 for i in range(k)]
            align = [
                (whole[i] / (total_g * norms[i]) if norms[i] > 0 else 0.0) if oracle == "cosine" else whole[i]
                for i in range(k)
            ]
            best = min(range(k), key=lambda i: (align[i], i))
            vertex = {n: (best if align[best] < 0 else None) for n in tv.names}
        gamma = min(1.0, step_size * 2.0 / (t + 2))
        gap = 0.0
        counts = {str(p): 0 for p in tv.model_dirs} | {"base": 0}
        for n in tv.names:
            target = [0.0] * k
            if vertex[n] is not None:
                target[vertex[n]] = scaling  # type: ignore[index]
            gap += sum((c - s) * d for c, s, d in zip(coefficients[n], target, dots[n]))
            coefficients[n] = [(1 - gamma) * c + gamma * s for c, s in zip(coefficients[n], target)]
            counts["base" if vertex[n] is None else str(tv.model_dirs[vertex[n]])] += 1  # type: ignore[index]
        history.append({"iteration": t, "loss": value, "gap": gap, "step": gamma, "selected": counts})
        t += 1
        save()
        if progress is not None:
            progress(t, iterations)
    _load_params(tv, coefficients)
    final_loss, _ = _loss_and_grad(tv, loss, seed, len(history), grad=False)
    if initial_loss is None:
        initial_loss = final_loss
    selections: dict[str, int] = {}
    for h in history:
        for key, count in h.get("selected", {}).items():
            selections[key] = selections.get(key, 0) + count
    result = FrankWolfeResult(
        coefficients, history, initial_loss, final_loss, len(history), Path(out_dir) if out_dir else None, selections
    )
    if out_dir is not None:
        report = {
            "method": "frank_wolfe",
            "paper": "Chen et al. 2025, FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization "
            "(arXiv:2503.12649)",
            "base": str(tv.base_dir),
            "models": [str(p) for p in tv.model_dirs],
            "granularity": granularity,
            "oracle": oracle,
            "step_size": step_size,
            "scaling": scaling,
            "init": init,
            "seed": seed,
            **result.to_json(),
            "coefficients": coefficients,
        }
        report.pop("out_dir")
        write_merge(
            tv, coefficients, out_dir, report, "frank_wolfe.json", overwrite=overwrite, merge_options=merge_options
        )
    return result
