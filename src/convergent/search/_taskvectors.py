"""Shared by data-driven merges (AdaMerging, Frank-Wolfe): task vectors in memory, results via the engine.

The base model is loaded with transformers (its parameter names are the
checkpoint's tensor names); each fine-tuned checkpoint is read tensor by
tensor and kept as a float32 task vector ``tau_k = theta_k - theta_base``.
Memory: about (models + 3) x the model in float32, so these methods are for
models that fit in RAM several times over.

Results are written by the engine as a ``task_arithmetic`` merge (``lambda: 1``,
no normalisation) whose per-model ``weight`` is a per-tensor coefficient
(mergekit conditions with each tensor's full name as ``filter``), so the
output is byte-reproducible from the ``recipe.yaml`` saved beside it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convergent.checkpoint import open_checkpoint
from convergent.errors import MergeInputError, RecipeError
from convergent.stats.hf import LoadedModel, load_model


@dataclass
class TaskVectors:
    loaded: LoadedModel  # the base model
    names: list[str]  # merged parameters (deduplicated), in the model's order
    base: dict[str, torch.Tensor]
    vectors: list[dict[str, torch.Tensor]]  # per model, aligned with ``names``
    aliases: dict[str, list[str]]  # parameter name -> every checkpoint name sharing it (tied weights)
    base_dir: Path
    model_dirs: list[Path]

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def merged(self, coefficients: Mapping[str, Sequence[float] | torch.Tensor]) -> dict[str, torch.Tensor]:
        """``base + sum_k c_k tau_k`` per parameter (coefficients per name, one per model)."""
        out = {}
        for name in self.names:
            c = coefficients[name]
            value = self.base[name]
            for k, vec in enumerate(self.vectors):
                value = value + c[k] * vec[name]
            out[name] = value
        return out


def load_task_vectors(base_dir: str | Path, model_dirs: Sequence[str | Path]) -> TaskVectors:
    if not model_dirs:
        raise RecipeError("no models to merge", "give at least one fine-tuned model besides the base")
    base_dir = Path(base_dir)
    loaded = load_model(base_dir)
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(False)
    base_names = set(open_checkpoint(base_dir).names())
    aliases: dict[str, list[str]] = {}
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.is_floating_point():
            continue
        key = first.setdefault(id(p), name)
        if name in base_names:
            aliases.setdefault(key, []).append(name)
    names = [n for n, p in model.named_parameters() if n in aliases]
    if not names:
        raise MergeInputError(f"{base_dir}: none of the model's parameters are tensors of the checkpoint")
    params = dict(model.named_parameters())
    base = {n: params[n].detach().clone() for n in names}
    vectors = []
    dirs = [Path(m) for m in model_dirs]
    for path in dirs:
        ckpt = open_checkpoint(path)
        vec = {}
        try:
            for n in names:
                stored = aliases[n][0]
                if stored not in ckpt:
                    raise MergeInputError(
                        f"tensor '{stored}' is in the base model {base_dir} but missing from {path}",
                        "merge checkpoints of the same architecture",
                    )
                value = ckpt.read(stored).to(torch.float32)
                if tuple(value.shape) != tuple(base[n].shape):
                    raise MergeInputError(
                        f"shape mismatch for tensor '{stored}': {base_dir}: {list(base[n].shape)}, "
                        f"{path}: {list(value.shape)}",
                        "merge models of the same size",
                    )
                vec[n] = value - base[n]
        finally:
            ckpt.close()
        vectors.append(vec)
    return TaskVectors(loaded, names, base, vectors, aliases, base_dir, dirs)


def task_arithmetic_recipe(
    tv: TaskVectors, coefficients: Mapping[str, Sequence[float]], task_wise: bool = False
) -> Any:
    """A task_arithmetic recipe giving ``base + sum_k c_k(tensor) tau_k`` for every tensor."""
    from convergent.recipe.schema import Recipe

    models = []
    for k, path in enumerate(tv.model_dirs):
        per_name = {alias: float(coefficients[n][k]) for n in tv.names for alias in tv.aliases[n]}
        if task_wise:
            weight: Any = next(iter(per_name.values()))
        else:
            # Longest filters first: no filter is a substring of a later tensor's exact name.
            conditions = [{"filter": name, "value": value} for name, value in per_name.items()]
            conditions.sort(key=lambda c: (-len(c["filter"]), c["filter"]))
            mean = sum(per_name.values()) / len(per_name)
            weight = [*conditions, {"value": mean}]  # tensors outside the model's parameters
        models.append({"model": str(path.resolve()), "parameters": {"weight": weight}})
    return Recipe.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tv.base_dir.resolve()),
            "models": models,
            "parameters": {"lambda": 1.0, "normalize": False},
        }
    )


def write_merge(
    tv: TaskVectors,
    coefficients: Mapping[str, Sequence[float]],
    out_dir: str | Path,
    report: Mapping[str, Any],
    report_name: str,
    *,
    task_wise: bool = False,
    overwrite: bool = False,
    merge_options: Mapping[str, Any] | None = None,
) -> Path:
    """Merge with the engine into ``out_dir``; ``recipe.yaml`` and the report are written beside the weights."""
    from convergent.engine import run_merge
    from convergent.recipe import build_job
    from convergent.search.coefficients import recipe_yaml

    recipe = task_arithmetic_recipe(tv, coefficients, task_wise)
    job = build_job(recipe, Path(out_dir), overwrite=overwrite, **dict(merge_options or {}))
    job.extra_files = {
        **job.extra_files,
        "recipe.yaml": recipe_yaml(recipe),
        report_name: (json.dumps(report, indent=1, sort_keys=True, default=str) + "\n").encode(),
    }
    run_merge(job, hash_outputs=False)
    return Path(out_dir)


def check_output(out_dir: str | Path | None, overwrite: bool) -> None:
    from convergent.search.coefficients import _check_output

    if out_dir is not None:
        _check_output(Path(out_dir), overwrite)
