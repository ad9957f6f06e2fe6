"""Open any supported checkpoint layout as a lazy :class:`TensorSource`.

Layouts: a Hugging Face model folder (sharded safetensors with
``model.safetensors.index.json``, or one ``model.safetensors``), a PEFT
adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), a bare
``.safetensors`` file, and ``.bin``/``.pt`` files, which are only ever opened
with ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from convergent.checkpoint.safetensors_file import SafetensorsFile
from convergent.checkpoint.source import TensorInfo, read_buffer
from convergent.errors import CheckpointError

#: Non-weight files worth carrying into a merged model so transformers can load it.
AUX_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "*.jinja",
    "tokenizer*",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
)
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


class Checkpoint:
    """A readable set of named tensors spread over one or more files."""

    def __init__(self, path: Path, kind: str, index: Mapping[str, SafetensorsFile | _TorchFile], folder: Path | None):
        self.path = path
        self.kind = kind
        self.label = str(path)
        self._index = dict(index)
        self._folder = folder

    def names(self) -> list[str]:
        return sorted(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def _file(self, name: str) -> SafetensorsFile | _TorchFile:
        try:
            return self._index[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: no tensor named '{name}'") from None

    def info(self, name: str) -> TensorInfo:
        return self._file(name).info(name)

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._file(name).read(name, rows, out)

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """A mapped, copy-on-write view of the tensor (or rows), or None where only ``read`` works."""
        return self._file(name).view(name, rows)

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Drop what ``view`` mapped for ``name`` (or its rows) from this process's memory."""
        self._file(name).release(name, rows)

    def files(self) -> dict[str, Path]:
        """Config and tokenizer files beside the weights (name -> path)."""
        if self._folder is None:
            return {}
        out = {}
        for entry in sorted(self._folder.iterdir()):
            if entry.is_file() and any(fnmatch.fnmatch(entry.name, p) for p in AUX_FILE_PATTERNS):
                out[entry.name] = entry
        return out

    def config(self) -> dict | None:
        """The folder's config.json (or adapter_config.json), parsed, if any."""
        for name in ("config.json", "adapter_config.json"):
            path = self.files().get(name)
            if path is not None:
                return json.loads(path.read_text())
        return None

    @property
    def nbytes(self) -> int:
        return sum(self.info(n).nbytes for n in self._index)

    def close(self) -> None:
        for f in {id(f): f for f in self._index.values()}.values():
            f.close()


class _TorchFile:
    """A .bin/.pt state dict loaded with weights_only=True (memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for bad or unsafe files
            raise CheckpointError(
                f"{path}: cannot load as a plain tensor state dict ({type(exc).__name__}: {str(exc)[:200]})",
                "only weights-only PyTorch files are read; convert other files to safetensors",
            ) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: not a flat dict of tensors", "save the model's state_dict()")
        self.tensors: dict[str, torch.Tensor] = state

    @property
    def entries(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (``SafetensorsFile.entries``' counterpart)."""
        return self.tensors

    def info(self, name: str) -> TensorInfo:
        t = self.tensors[name]
        return TensorInfo(t.dtype, tuple(t.shape))

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        t = self.tensors[name]
        if rows is not None and t.dim() >= 1:
            t = t[rows[0] : rows[1]]
        if out is None:
            return t.clone()
        dest = read_buffer(out, t.numel() * t.element_size()).view(t.dtype).view(t.shape)
        return dest.copy_(t)

    def view(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """No mapped view to offer (the engine reads a copy with ``read``)."""
        return None

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Nothing was mapped by ``view``."""

    def close(self) -> None:
        self.tensors = {}


def _index_files(files: list[SafetensorsFile | _TorchFile], label: Path) -> dict[str, SafetensorsFile | _TorchFile]:
    index: dict[str, SafetensorsFile | _TorchFile] = {}
    for f in files:
        for name in f.entries:
            if name in index:
                raise CheckpointError(f"{label}: tensor '{name}' appears in more than one file")
            index[name] = f
    return index


def _open_file(path: Path) -> SafetensorsFile | _TorchFile:
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in _TORCH_SUFFIXES:
        return _TorchFile(path)
    raise CheckpointError(f"{path}: unknown checkpoint file type", "use .safetensors, .bin or .pt")


def _sharded(folder: Path, index_path: Path, kind: str) -> Checkpoint:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid shard index ({exc})") from None
    shards: dict[str, SafetensorsFile | _TorchFile] = {}
    index: dict[str, SafetensorsFile | _TorchFile] = {}
    for name, shard in sorted(weight_map.items()):
        if "/" in shard or "\\" in shard or shard.startswith(".."):
            raise CheckpointError(f"{index_path}: shard name '{shard}' points outside the folder")
        if shard not in shards:
            shard_path = folder / shard
            if not shard_path.exists():
                raise CheckpointError(f"{index_path}: shard '{shard}' is missing", "copy the complete model folder")
            shards[shard] = _open_file(shard_path)
        f = shards[shard]
        if name not in f.entries:
            raise CheckpointError(f"{index_path}: tensor '{name}' is listed in '{shard}' but not stored there")
        index[name] = f
    return Checkpoint(folder, kind, index, folder)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open ``path`` (folder or file) lazily; CheckpointError if it is not a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder", "check the path in your recipe or command")
    if path.is_file():
        f = _open_file(path)
        return Checkpoint(path, "file", _index_files([f], path), None)
    candidates = [
        ("model.safetensors.index.json", "hf-sharded"),
        ("pytorch_model.bin.index.json", "hf-sharded-bin"),
    ]
    for index_name, kind in candidates:
        if (path / index_name).exists():
            return _sharded(path, path / index_name, kind)
    for weights, kind in (
        ("model.safetensors", "hf"),
        ("adapter_model.safetensors", "peft"),
        ("pytorch_model.bin", "hf-bin"),
        ("adapter_model.bin", "peft-bin"),
    ):
        if (path / weights).exists():
            if kind.startswith("peft") and not (path / "adapter_config.json").exists():
                raise CheckpointError(f"{path}: adapter weights without adapter_config.json")
            return Checkpoint(path, kind, _index_files([_open_file(path / weights)], path), path)
    loose = sorted(p for p in path.glob("*.safetensors"))
    if loose:
        return Checkpoint(path, "safetensors-folder", _index_files([_open_file(p) for p in loose], path), path)
    raise CheckpointError(
        f"{path}: no checkpoint found",
        "expected model.safetensors(.index.json), adapter_model.safetensors, pytorch_model.bin or *.safetensors",
    )
