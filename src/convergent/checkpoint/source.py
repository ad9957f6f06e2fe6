"""What the engine reads from: a named set of tensors it can load row ranges of.

Checkpoint folders and files implement it (``convergent.checkpoint.reader``),
and so do contributions in the store, so one engine serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class TensorInfo:
    """Dtype and shape of one tensor, known without reading its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@runtime_checkable
class TensorSource(Protocol):
    """A readable set of named tensors (a checkpoint in DESIGN.md's words)."""

    label: str

    def names(self) -> list[str]:
        """Tensor names, sorted."""
        ...

    def info(self, name: str) -> TensorInfo:
        """Dtype and shape of ``name``; CheckpointError if absent."""
        ...

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype, or only rows [start, stop) of dim 0."""
        ...
