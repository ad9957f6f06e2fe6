"""One .safetensors file, read lazily and checked before any byte is trusted.

The header is parsed and validated up front (size, JSON, dtypes, offsets
within the file, offsets matching shapes), so a truncated or corrupt file
fails with a clear message instead of a crash deep inside a merge. Row ranges
are read with ``os.preadv`` straight into a fresh tensor: no mmap, so reading
a model does not grow the process's resident memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import torch

from convergent.checkpoint.source import TensorInfo, read_buffer, read_exact
from convergent.determinism import row_numel
from convergent.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: corrupt or truncated safetensors file: {what}",
        "re-download or re-save this file; nothing was written",
    )


class SafetensorsFile:
    """Lazy reader of one safetensors file (thread-safe: positional reads only)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found", "check the path") from None
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot open ({exc.strerror})") from None
        self._lock = threading.Lock()
        try:
            self.entries, self.metadata, self.data_start = self._parse()
        except Exception:
            os.close(self._fd)
            raise

    def _parse(self) -> tuple[dict[str, tuple[TensorInfo, int, int]], dict[str, str], int]:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise _corrupt(self.path, f"only {size} bytes, no header")
        header_len = int.from_bytes(os.pread(self._fd, 8, 0), "little")
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise _corrupt(self.path, f"header length {header_len} does not fit a {size}-byte file")
        raw = os.pread(self._fd, header_len, 8)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _corrupt(self.path, f"header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise _corrupt(self.path, "header is not a JSON object")
        data_start = 8 + header_len
        data_len = size - data_start
        metadata = header.pop("__metadata__", None) or {}
        entries: dict[str, tuple[TensorInfo, int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise _corrupt(self.path, f"bad header entry for tensor '{name}'") from None
            info = TensorInfo(dtype, shape)
            if any(d < 0 for d in shape) or begin < 0 or end - begin != info.nbytes:
                raise _corrupt(self.path, f"tensor '{name}' offsets {begin}..{end} do not match shape {list(shape)}")
            if end > data_len:
                raise _corrupt(
                    self.path, f"tensor '{name}' ends at byte {end} but the file holds {data_len} data bytes"
                )
            entries[name] = (info, begin, end)
        return entries, metadata, data_start

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    def info(self, name: str) -> TensorInfo:
        return self.entries[name][0]

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        info, begin, end = self.entries[name]
        if rows is None or not info.shape:
            offset, nbytes, shape = begin, end - begin, info.shape
        else:
            start, stop = rows
            row_bytes = row_numel(info.shape) * info.dtype.itemsize
            offset, nbytes = begin + start * row_bytes, (stop - start) * row_bytes
            shape = (stop - start, *info.shape[1:])
        buf = read_buffer(out, nbytes)
        if not read_exact(self._fd, buf, self.data_start + offset):
            raise _corrupt(self.path, f"unexpected end of file while reading '{name}'")
        return buf.view(info.dtype).reshape(shape)
