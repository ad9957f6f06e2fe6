"""The contract between the engine and a merge strategy.

A strategy is a pure function from the inputs of one tensor to the merged
tensor. It never reads files and never touches a global RNG: the engine does
the I/O, hands it float32 tensors in canonical order, and casts the float32
result to the output dtype once at the end. Two exceptions serve the fused
kernels: a strategy declared with ``raw_inputs`` gets the tensors in their
stored floating dtype and converts what it reads itself (its arithmetic is
float32 all the same), and a strategy may return its result already in
``TensorTask.out_dtype`` when it rounds in the same pass, with the bits of
the engine's cast.

Two shapes of strategy exist, both declared with :func:`strategy`:

* ``chunkable=True``: ``apply`` works on any range of whole rows (elementwise
  or row-local maths). Whatever needs the whole tensor (a top-k threshold, a
  norm, a dot product) is computed first by ``prepare`` from fixed-size blocks,
  with exact or fixed-order reductions, so a tensor merged whole or in chunks
  gives the same bytes. This keeps memory flat on embeddings and lm_heads.
* ``chunkable=False``: ``apply`` gets the whole tensor (SVD, iterative means).
  The memory bound is stated in ``memory``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

from convergent import determinism
from convergent.strategies import kernels


class Params(BaseModel):
    """Global parameters of a strategy (mergekit's top-level ``parameters``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(BaseModel):
    """Per-model parameters (mergekit's ``models[].parameters``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=Params)
M = TypeVar("M", bound=ModelParams)

BaseRole = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class TensorTask(Generic[P, M]):
    """Inputs of one tensor, or of the rows ``rows`` of it, for one merge.

    ``base`` and ``models`` hold float32 tensors covering ``rows`` of a tensor
    whose full shape is ``shape``; ``models`` is in canonical order and lines
    up with ``model_params``. ``key`` seeds every random draw (see
    :mod:`convergent.determinism`). ``layer``/``num_layers`` locate the tensor
    in depth when it belongs to a numbered layer. ``extras`` holds per-model
    auxiliary tensors (Fisher diagonals, Gram matrices) by kind, aligned with
    ``models``, for strategies that declare ``statistics``.
    """

    name: str
    shape: tuple[int, ...]
    rows: tuple[int, int]
    base: torch.Tensor | None
    models: tuple[torch.Tensor, ...]
    params: P
    model_params: tuple[M, ...]
    key: bytes = b""
    layer: int | None = None
    num_layers: int | None = None
    extras: Mapping[str, tuple[torch.Tensor | None, ...]] = field(default_factory=dict)
    out_dtype: torch.dtype | None = None

    @property
    def is_whole(self) -> bool:
        return self.rows == (0, determinism.num_rows(self.shape))

    def task_vectors(self) -> list[torch.Tensor]:
        """``model - base`` for every model (requires a base)."""
        if self.base is None:
            raise ValueError(f"{self.name}: this strategy needs a base model")
        return [m - self.base for m in self.models]

    def keep_mask(self, purpose: str, p: float | torch.Tensor) -> torch.Tensor:
        """Flat 1.0/0.0 mask of this chunk's ``uniform_rows(key, purpose, ...) < p`` (``p`` in float32).

        ``p`` is a number, or one per element. A Bernoulli keep mask (DARE,
        DELLA), chunk-invariant, drawn and compared in one fused pass.
        ``purpose`` names the draw, e.g. ``f"dare/{i}"`` for model i's mask.
        """
        seed = determinism.stream_seed(self.key, purpose)
        bound = p.reshape(-1).numpy() if isinstance(p, torch.Tensor) else p
        return torch.from_numpy(kernels.keep_mask(seed, *determinism.element_range(self.shape, *self.rows), bound))

    def generator(self, purpose: str) -> torch.Generator:
        """A seeded generator for whole-tensor strategies (not chunk-invariant)."""
        return determinism.generator(self.key, purpose)


class TensorBlocks(Generic[P, M]):
    """The whole tensor as a sequence of fixed blocks, for ``prepare``.

    Blocks are always the same rows for a given shape, so reductions done
    block by block in order are identical whether the engine holds the tensor
    whole or streams it from disk. ``blocks()`` may be iterated more than once
    (e.g. two passes of an exact top-k selection).
    """

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        params: P,
        model_params: tuple[M, ...],
        load: Callable[[int, int], TensorTask[P, M]],
    ):
        self.name = name
        self.shape = shape
        self.params = params
        self.model_params = model_params
        self._load = load

    @property
    def numel(self) -> int:
        return determinism.num_rows(self.shape) * determinism.row_numel(self.shape)

    def rows(self, start: int, stop: int) -> TensorTask[P, M]:
        """Any range of rows (e.g. a sample); blocks() is what reductions must use."""
        return self._load(start, stop)

    def blocks(self) -> Iterator[TensorTask[P, M]]:
        total = determinism.num_rows(self.shape)
        step = determinism.block_rows(self.shape)
        for start in range(0, total, step):
            yield self._load(start, min(total, start + step))


ApplyFn = Callable[[TensorTask[Any, Any], Any], torch.Tensor]
PrepareFn = Callable[[TensorBlocks[Any, Any]], Any]


@dataclass(frozen=True)
class Strategy:
    """A registered strategy and everything the engine and CLI need to know."""

    name: str
    apply: ApplyFn
    params: type[Params]
    model_params: type[ModelParams]
    base: BaseRole
    chunkable: bool
    prepare: PrepareFn | None
    stochastic: bool
    min_models: int
    max_models: int | None
    paper: str
    summary: str
    memory: str
    statistics: tuple[str, ...]
    family: str
    #: Every NaN/Inf in an input reaches the output (weighted sums): the engine
    #: then checks each output chunk instead of every input chunk.
    propagates_nonfinite: bool = False
    #: ``base``/``models`` come in their stored floating dtype (float32, bfloat16,
    #: float16 or float64) as read-only views valid for the call, not as float32 copies.
    raw_inputs: bool = False
    #: Called once, on a background thread, when a merge using the strategy
    #: starts (e.g. loads compiled kernels while the first tensors are read).
    warm_up: Callable[[], None] | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (``convergent strategies --json``)."""

        def fields(model: type[BaseModel]) -> list[dict[str, Any]]:
            out = []
            for pname, info in model.model_fields.items():
                out.append(
                    {
                        "name": pname,
                        "type": _type_name(info.annotation),
                        "default": None if info.is_required() else _jsonable(info.default),
                        "required": info.is_required(),
                        "description": info.description or "",
                    }
                )
            return out

        return {
            "name": self.name,
            "family": self.family,
            "summary": self.summary,
            "paper": self.paper,
            "base_model": self.base,
            "parameters": fields(self.params),
            "model_parameters": fields(self.model_params),
            "stochastic": self.stochastic,
            "streams_in_chunks": self.chunkable,
            "memory": self.memory,
            "min_models": self.min_models,
            "max_models": self.max_models,
            "statistics": list(self.statistics),
        }


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


REGISTRY: dict[str, Strategy] = {}


def strategy(
    name: str,
    *,
    params: type[Params] = Params,
    model_params: type[ModelParams] = ModelParams,
    base: BaseRole = "none",
    chunkable: bool = True,
    prepare: PrepareFn | None = None,
    stochastic: bool = False,
    min_models: int = 1,
    max_models: int | None = None,
    paper: str = "",
    summary: str = "",
    memory: str = "",
    statistics: tuple[str, ...] = (),
    family: str = "mergekit",
    propagates_nonfinite: bool = False,
    raw_inputs: bool = False,
    warm_up: Callable[[], None] | None = None,
) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``fn(task, prepared) -> Tensor`` under ``name``.

    ``prepared`` is what ``prepare(blocks)`` returned, or None without one.
    ``memory`` states the peak working memory when the strategy cannot stream
    (e.g. "whole tensor x (models + 2)"). ``propagates_nonfinite`` promises
    that any NaN/Inf input element makes some output element non-finite.
    ``raw_inputs``: the task's tensors keep their stored dtype (see ``Strategy``);
    the strategy must convert to float32 before any arithmetic, and must not
    write into them or keep them past the call.
    """

    def register(fn: ApplyFn) -> ApplyFn:
        if name in REGISTRY:
            raise ValueError(f"strategy {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        REGISTRY[name] = Strategy(
            name=name,
            apply=fn,
            params=params,
            model_params=model_params,
            base=base,
            chunkable=chunkable,
            prepare=prepare,
            stochastic=stochastic,
            min_models=min_models,
            max_models=max_models,
            paper=paper,
            summary=summary or (doc[0] if doc else ""),
            memory=memory or ("streams in row chunks" if chunkable else "whole tensor per input"),
            statistics=statistics,
            family=family,
            propagates_nonfinite=propagates_nonfinite,
            raw_inputs=raw_inputs,
            warm_up=warm_up,
        )
        return fn

    return register
