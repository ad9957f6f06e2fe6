"""Run a strategy on tensors held in memory.

The engine uses this for tensors that fit its memory budget; tests use it to
check each strategy against a reference and to prove chunk invariance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from convergent import determinism
from convergent.errors import RecipeError, suggest
from convergent.strategies.api import REGISTRY, ModelParams, Params, Strategy, TensorBlocks, TensorTask


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``; a RecipeError with a suggestion otherwise."""
    import convergent.strategies  # noqa: F401  (registers every family)

    try:
        return REGISTRY[name]
    except KeyError:
        raise RecipeError(
            f"unknown merge method '{name}'",
            suggest(name, REGISTRY) or "run 'convergent strategies' to list them",
        ) from None


def validate_params(strat: Strategy, params: Mapping[str, Any] | Params | None) -> Params:
    """Build the strategy's typed global parameters, naming any bad field."""
    if isinstance(params, strat.params):
        return params
    return _build(strat, strat.params, dict(params or {}), "parameter")


def validate_model_params(
    strat: Strategy, params: Mapping[str, Any] | ModelParams | None, model: str = ""
) -> ModelParams:
    """Build the strategy's typed per-model parameters, naming any bad field."""
    if isinstance(params, strat.model_params):
        return params
    where = f"model parameter (model {model})" if model else "model parameter"
    return _build(strat, strat.model_params, dict(params or {}), where)


def _build(strat: Strategy, cls: type[Params] | type[ModelParams], values: dict[str, Any], what: str) -> Any:
    from pydantic import ValidationError

    allowed = list(cls.model_fields)
    for key in values:
        if key not in allowed:
            hint = suggest(key, allowed)
            listing = ", ".join(allowed) or "none"
            raise RecipeError(
                f"unknown {what} '{key}' for merge method '{strat.name}'",
                f"{hint + ' ' if hint else ''}allowed: {listing}",
            )
    try:
        return cls(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ())) or "?"
        raise RecipeError(
            f"invalid {what} '{field}' for merge method '{strat.name}': {err.get('msg')}",
            f"allowed: {', '.join(allowed)}",
        ) from None


def make_task(
    strat: Strategy,
    name: str,
    shape: tuple[int, ...],
    rows: tuple[int, int],
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    params: Params,
    model_params: Sequence[ModelParams],
    key: bytes,
    layer: int | None = None,
    num_layers: int | None = None,
    extras: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
    out_dtype: torch.dtype | None = None,
) -> TensorTask[Any, Any]:
    return TensorTask(
        name=name,
        shape=shape,
        rows=rows,
        base=base,
        models=tuple(models),
        params=params,
        model_params=tuple(model_params),
        key=key,
        layer=layer,
        num_layers=num_layers,
        extras={k: tuple(v) for k, v in (extras or {}).items()},
        out_dtype=out_dtype,
    )


def _rows(t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    if t is None:
        return None
    return t[start:stop] if t.dim() >= 1 else t


def _rows32(t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Rows of an input as a float32 copy the strategy owns (inputs may be held in their stored dtype).

    Always a copy, float32 inputs included: an input may be a view of a
    mapped file shared with other tensors' merges, so a strategy working in
    place must not write into it.
    """
    rows = _rows(t, start, stop)
    return None if rows is None else rows.to(torch.float32, copy=True)


def merge_tensors(
    method: str,
    models: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    params: Mapping[str, Any] | Params | None = None,
    model_params: Sequence[Mapping[str, Any] | ModelParams] | None = None,
    name: str = "tensor",
    seed: int | str | bytes = 0,
    chunk_rows: int | None = None,
    layer: int | None = None,
    num_layers: int | None = None,
    extras: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
) -> torch.Tensor:
    """Merge in-memory tensors with strategy ``method``; returns float32.

    ``chunk_rows`` (rounded up to whole blocks) makes chunkable strategies
    work chunk by chunk, as the engine does for big tensors; the result must
    not depend on it.
    """
    strat = get_strategy(method)
    gp = validate_params(strat, params)
    mps = [validate_model_params(strat, p) for p in (model_params or [{}] * len(models))]
    if len(mps) != len(models):
        raise RecipeError(f"{len(models)} models but {len(mps)} model parameter sets")
    shape = tuple(models[0].shape) if models else tuple(base.shape)  # type: ignore[union-attr]
    key = determinism.seed_key(seed, name)
    return run_strategy(
        strat,
        name,
        shape,
        base,  # converted to float32 chunk by chunk
        models,
        gp,
        mps,
        key,
        chunk_rows=chunk_rows,
        layer=layer,
        num_layers=num_layers,
        extras=extras,
    )


def run_strategy(
    strat: Strategy,
    name: str,
    shape: tuple[int, ...],
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    params: Params,
    model_params: Sequence[ModelParams],
    key: bytes,
    *,
    chunk_rows: int | None = None,
    layer: int | None = None,
    num_layers: int | None = None,
    extras: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
    sink: Callable[[torch.Tensor, int], None] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """Apply ``strat`` to tensors in memory, whole or chunk by chunk.

    Inputs may be in any floating dtype; each block or chunk is converted to
    float32 as it is handed to the strategy (unless it takes ``raw_inputs``),
    so bfloat16 inputs are held at half the memory.

    With ``sink``, each chunk's result is handed to ``sink(out, row_start)``
    as soon as it is computed (and None is returned), so only one chunk of
    output exists at a time; otherwise the full result is returned. Results
    are float32, or ``out_dtype`` where the strategy produced that itself
    (see ``TensorTask.out_dtype``).
    """
    total = determinism.num_rows(shape)
    extras = extras or {}
    rows_of = _rows if strat.raw_inputs else _rows32

    def load(start: int, stop: int) -> TensorTask[Any, Any]:
        return make_task(
            strat,
            name,
            shape,
            (start, stop),
            rows_of(base, start, stop),
            [rows_of(m, start, stop) for m in models],
            params,
            model_params,
            key,
            layer,
            num_layers,
            # Row-aligned statistics are sliced with the rows; others (Gram
            # matrices) only reach whole-tensor strategies and stay whole.
            {k: [_rows(t, start, stop) if strat.chunkable else t for t in v] for k, v in extras.items()},
            out_dtype,
        )

    prepared = None
    if strat.prepare is not None:
        prepared = strat.prepare(TensorBlocks(name, shape, params, tuple(model_params), load))
    if not strat.chunkable or chunk_rows is None or chunk_rows >= total:
        ranges = [(0, total)]
    else:
        step = determinism.block_rows(shape)
        step = max(step, (chunk_rows + step - 1) // step * step)
        ranges = [(s, min(total, s + step)) for s in range(0, total, step)]
    parts = []
    for start, stop in ranges:
        out = _check_output(
            strat, name, strat.apply(load(start, stop), prepared), (stop - start, *shape[1:]), shape, out_dtype
        )
        if sink is not None:
            sink(out, start)
        else:
            parts.append(out)
    if sink is not None:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _check_output(
    strat: Strategy,
    name: str,
    out: torch.Tensor,
    chunk_shape: tuple[int, ...],
    shape: tuple[int, ...],
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    expected = chunk_shape if shape else ()
    if tuple(out.shape) != expected:
        raise RuntimeError(f"strategy {strat.name} returned shape {tuple(out.shape)} for {name}, expected {expected}")
    return out if out.dtype == out_dtype else out.to(torch.float32)
