"""Turn a parsed mergekit recipe into an engine :class:`MergeJob`.

``models:`` recipes merge every tensor of the base (or first model) with all
models; ``slices:`` recipes stack layer ranges (passthrough frankenmerges) or
merge per slice, renumbering layers in the output. Parameter precedence is
mergekit's: a model's (or slice source's) own setting, then the slice's,
then the top-level ``parameters``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convergent.checkpoint.reader import Checkpoint, open_checkpoint
from convergent.engine.execute import LAYER_PATTERN, layer_of
from convergent.engine.job import MergeJob, ModelInput, OutputTensor
from convergent.errors import CheckpointError, RecipeError
from convergent.recipe.schema import InputModel, Recipe
from convergent.recipe.settings import evaluate_all
from convergent.strategies.run import get_strategy

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}

#: Non-layer tensors taken from the first slice; every other one from the last.
_PRE_LAYER = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type|patch_embed")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise RecipeError(f"unknown dtype '{name}'", f"use one of: {', '.join(sorted(DTYPE_NAMES))}") from None


@dataclass
class _Models:
    """Opens each referenced checkpoint once, resolving relative paths."""

    search_dirs: tuple[Path, ...]

    def __post_init__(self) -> None:
        self.opened: dict[str, Checkpoint] = {}

    def path(self, ref: str) -> Path:
        candidate = Path(ref).expanduser()
        if candidate.is_absolute():
            return candidate
        for folder in self.search_dirs:
            if (folder / candidate).exists():
                return folder / candidate
        return candidate

    def open(self, ref: str) -> Checkpoint:
        if ref not in self.opened:
            path = self.path(ref)
            if not path.exists():
                raise CheckpointError(
                    f"model '{ref}' not found",
                    "give a local path; convergent never downloads from a model hub (download it first)",
                )
            self.opened[ref] = open_checkpoint(path)
        return self.opened[ref]


def _depths(names: list[str]) -> dict[str, float]:
    """mergekit's t per tensor: layer i of N -> i/(N-1) (1 when N == 1); 0 outside layers."""
    layers = sorted({layer for n in names if (layer := layer_of(n)) is not None})
    count = len(layers)
    out = {}
    for n in names:
        layer = layer_of(n)
        if layer is None:
            out[n] = 0.0
        else:
            out[n] = layers.index(layer) / (count - 1) if count > 1 else 1.0
    return out


def build_job(
    recipe: Recipe,
    out_dir: Path,
    *,
    recipe_dir: Path | None = None,
    **options: Any,
) -> MergeJob:
    """A MergeJob for ``recipe``; ``options`` are MergeJob fields (threads, seed, ...)."""
    strat = get_strategy(recipe.merge_method)
    models = _Models(tuple(p for p in (Path.cwd(), recipe_dir) if p is not None))
    dtype = parse_dtype(recipe.out_dtype) or parse_dtype(recipe.dtype)
    top = recipe.parameters or {}
    if recipe.models:
        job = _from_models(recipe, strat.base, models, top, out_dir, dtype, options)
    else:
        job = _from_slices(recipe, strat.base, models, top, out_dir, dtype, options)
    return job


def _files(models: _Models, recipe: Recipe, fallback: Checkpoint) -> dict[str, Path]:
    """Config from the base (or first model); tokenizer from ``tokenizer_source`` when given."""
    files = fallback.files()
    if recipe.tokenizer_source in (None, "base"):
        return files
    tokenizer_files = models.open(recipe.tokenizer_source).files()
    kept = {k: v for k, v in files.items() if "token" not in k and k not in ("vocab.json", "merges.txt")}
    kept.update({k: v for k, v in tokenizer_files.items() if k != "config.json"})
    return kept


def _from_models(recipe, base_role, models: _Models, top, out_dir, dtype, options) -> MergeJob:
    base_ref = recipe.base_model
    base = models.open(base_ref) if base_ref else None
    entries = [m for m in recipe.models if not (base_ref and base_role != "none" and m.model == base_ref)]
    if base_ref and base_role == "none" and all(m.model != base_ref for m in recipe.models):
        # mergekit appends an unlisted base_model as one more input of methods that ignore bases.
        entries.append(InputModel(model=base_ref))
    if not entries:
        raise RecipeError("the recipe lists no models besides the base model", "add the models to merge under models:")
    reference = base if (base is not None and base_role != "none") else models.open(entries[0].model)
    depth = _depths(reference.names())

    def global_params(name: str, _layer: int | None, _n: int | None) -> Mapping[str, Any]:
        return evaluate_all([top], name, depth.get(name, 0.0))

    inputs = []
    for entry in entries:
        settings = entry.parameters

        def model_params(name: str, _layer: int | None, _n: int | None, s=settings) -> Mapping[str, Any]:
            return evaluate_all([s], name, depth.get(name, 0.0))

        inputs.append(ModelInput(models.open(entry.model), model_params))
    return MergeJob(
        method=recipe.merge_method,
        models=inputs,
        base=base if base_role != "none" else None,
        params=global_params,
        dtype=dtype,
        out_dir=out_dir,
        files=_files(models, recipe, base or inputs[0].source),  # type: ignore[arg-type]
        **options,
    )


def _renumber(name: str, layer: int) -> str:
    return LAYER_PATTERN.sub(lambda m: m.group(0).replace(m.group(1), str(layer)), name, count=1)


def _from_slices(recipe, base_role, models: _Models, top, out_dir, dtype, options) -> MergeJob:
    base_refs = {s.base_model for s in recipe.slices if s.base_model} | ({recipe.base_model} - {None})
    if len(base_refs) > 1:
        raise RecipeError("slices with different base_model values are not supported", "use one base_model")
    base_ref = next(iter(base_refs), None)
    base = models.open(base_ref) if base_ref else None
    # One ModelInput per distinct model, in order of first appearance.
    refs: list[str] = []
    for sl in recipe.slices:
        for src in sl.sources:
            if src.model not in refs and not (base_role != "none" and src.model == base_ref):
                refs.append(src.model)
    if not refs:
        raise RecipeError("the slices name no models besides the base model")
    index = {ref: i for i, ref in enumerate(refs)}
    # Output name -> (slice, t, {model ref: input name}) for parameter lookups.
    where: dict[str, tuple[int, float]] = {}
    outputs: list[OutputTensor] = []
    first, last = recipe.slices[0], recipe.slices[-1]
    reference = models.open(first.sources[0].model)
    layer_names = [n for n in reference.names() if layer_of(n) is not None]
    template_layer = min((layer_of(n) for n in layer_names), default=None)

    def add(out_name: str, sl_index: int, t: float, names_by_ref: dict[str, str], base_name: str) -> None:
        used = [r for r in names_by_ref if r in index]
        outputs.append(
            OutputTensor(
                name=out_name,
                source_name=base_name,
                models=tuple(index[r] for r in used),
                model_source_names=tuple(names_by_ref[r] for r in used),
            )
        )
        where[out_name] = (sl_index, t)

    for name in reference.names():
        if layer_of(name) is None and _PRE_LAYER.search(name):
            add(name, 0, 0.0, {s.model: name for s in first.sources}, name)
    out_layer = 0
    layer_origin: list[int] = []  # output layer -> source layer (first source), for config lists
    templates = [n for n in layer_names if layer_of(n) == template_layer]
    for sl_index, sl in enumerate(recipe.slices):
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            for template in templates:
                names_by_ref = {s.model: _renumber(template, s.layer_range[0] + offset) for s in sl.sources}
                base_name = names_by_ref.get(base_ref or "", next(iter(names_by_ref.values())))
                add(_renumber(template, out_layer), sl_index, t, names_by_ref, base_name)
            layer_origin.append(sl.sources[0].layer_range[0] + offset)
            out_layer += 1
    for name in reference.names():
        if layer_of(name) is None and not _PRE_LAYER.search(name):
            add(name, len(recipe.slices) - 1, 0.0, {s.model: name for s in last.sources}, name)

    def global_params(name: str, _layer: int | None, _n: int | None) -> Mapping[str, Any]:
        sl_index, t = where[name]
        return evaluate_all([recipe.slices[sl_index].parameters, top], name, t)

    def model_params_for(ref: str):
        def params(name: str, _layer: int | None, _n: int | None) -> Mapping[str, Any]:
            sl_index, t = where[name]
            own = [s.parameters for s in recipe.slices[sl_index].sources if s.model == ref]
            return evaluate_all(own, name, t)

        return params

    inputs = [ModelInput(models.open(ref), model_params_for(ref)) for ref in refs]
    files = _files(models, recipe, base or reference)
    extra = {}
    config = (base or reference).config()
    if config is not None and "config.json" in files:
        files.pop("config.json")
        extra["config.json"] = _restack_config(config, layer_origin)
    return MergeJob(
        method=recipe.merge_method,
        models=inputs,
        base=base if base_role != "none" else None,
        params=global_params,
        dtype=dtype,
        out_dir=out_dir,
        tensors=outputs,
        files=files,
        extra_files=extra,
        **options,
    )


def _restack_config(config: dict[str, Any], layer_origin: list[int]) -> bytes:
    """The base config with the layer count (and per-layer lists) of the stacked output."""
    import json

    config = dict(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            old = config[key]
            config[key] = len(layer_origin)
            for list_key, value in list(config.items()):
                if isinstance(value, list) and len(value) == old and list_key.startswith("layer"):
                    config[list_key] = [value[i] for i in layer_origin]
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
