"""Small in-memory checkpoints and store helpers for the merge-set tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from convergent.checkpoint.source import TensorInfo

#: name -> (shape, dtype) of a tiny Llama-ish model (two layers, chunkable rows).
SHAPES: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "model.embed_tokens.weight": ((24, 8), torch.bfloat16),
    "model.layers.0.mlp.up_proj.weight": ((16, 8), torch.float32),
    "model.layers.1.mlp.up_proj.weight": ((16, 8), torch.float32),
    "model.norm.weight": ((8,), torch.float32),
}


class DictSource:
    """A TensorSource over tensors held in memory."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str = "dict"):
        self.tensors = tensors
        self.label = label

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def info(self, name: str) -> TensorInfo:
        t = self.tensors[name]
        return TensorInfo(t.dtype, tuple(t.shape))

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        t = self.tensors[name]
        t = t if rows is None else t[rows[0] : rows[1]]
        if out is None:
            return t
        return out[: t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)

    def view(self, name: str, rows: tuple[int, int] | None = None) -> None:
        return None

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        pass


def base_tensors(shapes: dict | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=gen).to(d) for n, (s, d) in (shapes or SHAPES).items()}


def finetune(k: int, shapes: dict | None = None, scale: float = 0.05) -> DictSource:
    """Fine-tune ``k``: the base plus seeded noise (deterministic in k)."""
    base = base_tensors(shapes)
    gen = torch.Generator().manual_seed(1000 + k)
    out = {n: (t.float() + scale * torch.randn(t.shape, generator=gen)).to(t.dtype) for n, t in base.items()}
    return DictSource(out, label=f"ft{k}")


def base_source(shapes: dict | None = None) -> DictSource:
    return DictSource(base_tensors(shapes), label="base")


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def store_snapshot(path: Path) -> tuple:
    """Everything observable about a store: DB rows and blob files (for 'store untouched' checks)."""
    import sqlite3

    conn = sqlite3.connect(path / "store.db")
    try:
        rows = tuple(
            tuple(conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall())
            for t in ("manifests", "manifest_blobs", "sets", "contributions", "tags", "tombstones", "log")
        )
    finally:
        conn.close()
    blobs = tuple(sorted(str(p.relative_to(path)) for p in (path / "blobs").rglob("*") if p.is_file()))
    return rows, blobs


def save_folder(path: Path, source: DictSource, config: dict | None = None) -> Path:
    """Write ``source`` as a Hugging Face-style folder (model.safetensors + config.json), without transformers."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in source.tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "tiny", "hidden_size": 8}) + "\n")
    return path


def save_family(root: Path, count: int = 3) -> tuple[Path, list[Path]]:
    """A base folder and ``count`` fine-tune folders built from :func:`finetune`."""
    base = save_folder(root / "base", base_source())
    return base, [save_folder(root / f"ft{k}", finetune(k)) for k in range(count)]
