"""A ``TensorSource`` over a stored manifest: the engine reads contributions from the store.

Reads go straight to the blob files, a row range at a time, so a resolve
never loads more of a tensor than the engine asks for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from convergent.checkpoint.source import TensorInfo
from convergent.errors import CheckpointError
from convergent.sets.model import Manifest
from convergent.store.blobs import BlobStore, torch_dtype


class StoredCheckpoint:
    """The tensors of ``manifest``, read from ``blobs``."""

    def __init__(self, blobs: BlobStore, manifest: Manifest, label: str = ""):
        self.blobs = blobs
        self.manifest = manifest
        self.label = label or f"manifest {manifest.id[:12]}"
        self._names = sorted(manifest.tensors)
        self._entries = {n: (e.blob, e.dtype, tuple(e.shape)) for n, e in manifest.tensors.items()}

    def names(self) -> list[str]:
        return list(self._names)

    def _entry(self, name: str):
        try:
            return self.manifest.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.label} has no tensor '{name}'") from None

    def info(self, name: str) -> TensorInfo:
        e = self._entry(name)
        return TensorInfo(dtype=torch_dtype(e.dtype), shape=tuple(e.shape))

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        try:
            blob, dtype, shape = self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.label} has no tensor '{name}'") from None
        return self.blobs.read_known(blob, dtype, shape, rows, out)

    def view(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Blobs are read, not mapped (``read``)."""
        return None

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Nothing is mapped."""

    def files(self) -> dict[str, bytes]:
        """Non-tensor files (config, tokenizer) as bytes."""
        return {name: self.blobs.read_bytes(d) for name, d in sorted(self.manifest.files.items())}

    def file_path(self, name: str) -> Path:
        return self.blobs.path(self.manifest.files[name])
