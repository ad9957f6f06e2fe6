"""A merge job: everything the engine needs, already validated, no YAML.

Recipes (``convergent.recipe``) and merge sets (``convergent.sets``) both turn
into a ``MergeJob``; ``convergent.engine.run_merge`` executes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convergent.checkpoint.source import TensorSource

#: Parameters for one tensor: fn(tensor_name, layer_index|None, num_layers|None) -> dict.
ParamFn = Callable[[str, int | None, int | None], Mapping[str, Any]]


def constant(params: Mapping[str, Any] | None) -> ParamFn:
    """Parameters that are the same for every tensor."""
    fixed = dict(params or {})
    return lambda _name, _layer, _n: fixed


@dataclass
class ModelInput:
    """One input model with its (possibly per-tensor) parameters."""

    source: TensorSource
    params: ParamFn = field(default_factory=lambda: constant(None))
    #: Per-model auxiliary tensors by kind ("fisher", "gram"), keyed by tensor name.
    statistics: Mapping[str, TensorSource] = field(default_factory=dict)


@dataclass
class OutputTensor:
    """One tensor of the output: where its inputs come from.

    ``name`` is the output name; ``source_name`` the name read from the inputs
    (they differ when passthrough slices renumber layers); ``models`` indexes
    into ``MergeJob.models`` (None = all of them).
    """

    name: str
    source_name: str
    models: tuple[int, ...] | None = None
    method: str | None = None
    params: ParamFn | None = None
    #: Per-model input names when they differ (layer_range slices), aligned with ``models``.
    model_source_names: tuple[str, ...] | None = None


@dataclass
class MergeJob:
    method: str
    models: list[ModelInput]
    out_dir: Path
    base: TensorSource | None = None
    params: ParamFn = field(default_factory=lambda: constant(None))
    #: Output dtype; None keeps the base's (or first model's) dtype per tensor.
    dtype: torch.dtype | None = None
    #: Seed for stochastic strategies: --seed for one-shot merges, the Merkle root for sets.
    seed: int | str | bytes = 0
    threads: int = 2
    memory_limit: int = 2 * 1024**3
    max_shard_size: int = 5 * 1000**3
    overwrite: bool = False
    allow_nonfinite: bool = False
    #: Non-tensor files copied into the output (output name -> source path):
    #: config.json, generation_config.json, tokenizer files of the base.
    files: Mapping[str, Path] = field(default_factory=dict)
    #: Extra files written into the output (name -> bytes).
    extra_files: Mapping[str, bytes] = field(default_factory=dict)
    #: Called with {file name: sha256} of everything written, just before the
    #: output is renamed into place; returns more files to add (provenance).
    finalize: Callable[[dict[str, str]], Mapping[str, bytes]] | None = None
    #: Explicit output tensors (passthrough slices); None = every base tensor.
    tensors: list[OutputTensor] | None = None
    #: Row-chunk size override for tests (rows); None = from memory_limit.
    chunk_rows: int | None = None
    progress: Callable[[int, int], None] | None = None


@dataclass
class MergeResult:
    out_dir: Path
    #: Output file name -> sha256 hex, for every file written.
    files: dict[str, str]
    tensors: int
    parameters: int
    seconds: float
