"""What the engine reads from: a named set of tensors it can load row ranges of.

Checkpoint folders and files implement it (``convergent.checkpoint.reader``),
and so do contributions in the store, so one engine serves both.
"""

from __future__ import annotations

import os
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

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype, or only rows [start, stop) of dim 0.

        ``out``, a flat uint8 tensor with room for the bytes, is filled and the
        result is a view of it: the engine reuses such buffers, because reading
        into fresh memory costs a page fault per 4 kB (3-5x slower than the copy).
        """
        ...

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Tensor ``name`` (or rows) without a copy: a copy-on-write view of a mapped file; None where only
        ``read`` works (the engine then reads). Valid until :meth:`release` of the same rows."""
        ...

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Give back the memory that :meth:`view` mapped for ``name`` (or those rows); a no-op without views."""
        ...


def read_buffer(out: torch.Tensor | None, nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor of ``nbytes`` to read into: a prefix of ``out``, or new memory."""
    if out is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < nbytes or not out.is_contiguous():
        raise ValueError(f"read buffer must be a contiguous 1-D uint8 tensor of at least {nbytes} bytes")
    return out[:nbytes]


def read_exact(fd: int, buf: torch.Tensor, pos: int) -> bool:
    """Fill ``buf`` (a flat uint8 tensor) from ``fd`` at ``pos``; False if the file ends first."""
    view = memoryview(buf.numpy())
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], pos + done)
        if got <= 0:
            return False
        done += got
    return True
