"""One .safetensors file, read lazily and checked before any byte is trusted.

The header is parsed and validated up front (size, JSON, dtypes, offsets
within the file, offsets matching shapes), so a truncated or corrupt file
fails with a clear message instead of a crash deep inside a merge.

Two ways to get a tensor's bytes: ``read`` copies them with ``os.preadv``
into memory the caller owns; ``view`` maps them (copy-on-write, so a write
never reaches the file) without copying, which the engine uses for merges:
the copy from the page cache was a third of a linear merge's CPU time.
``release`` drops a tensor's mapped pages from the process (they stay in the
page cache), so resident memory stays bounded by the tensors in flight. The
file must not be truncated while views of it are in use (as with any mmap:
the reader would get SIGBUS); checkpoints being merged are not written to.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import threading
from pathlib import Path

import numpy as np
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
        self._map: mmap.mmap | None = None
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
            if self._map is not None:
                with contextlib.suppress(BufferError):  # views still alive: unmapped when they go
                    self._map.close()
                self._map = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    def info(self, name: str) -> TensorInfo:
        return self.entries[name][0]

    def _extent(self, name: str, rows: tuple[int, int] | None) -> tuple[TensorInfo, int, int, tuple[int, ...]]:
        """(info, file offset, byte count, shape) of the tensor or its rows [start, stop)."""
        info, begin, end = self.entries[name]
        if rows is None or not info.shape:
            return info, self.data_start + begin, end - begin, info.shape
        start, stop = rows
        row_bytes = row_numel(info.shape) * info.dtype.itemsize
        shape = (stop - start, *info.shape[1:])
        return info, self.data_start + begin + start * row_bytes, (stop - start) * row_bytes, shape

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        info, offset, nbytes, shape = self._extent(name, rows)
        buf = read_buffer(out, nbytes)
        if not read_exact(self._fd, buf, offset):
            raise _corrupt(self.path, f"unexpected end of file while reading '{name}'")
        return buf.view(info.dtype).reshape(shape)

    def view(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The tensor (or rows) as a view of the mapped file; None when its bytes are not aligned for its dtype.

        Writable, but copy-on-write: the file never changes.
        """
        info, offset, nbytes, shape = self._extent(name, rows)
        if offset % info.dtype.itemsize or nbytes == 0:
            return None
        mapped = self._mapped()
        if offset + nbytes > len(mapped):
            raise _corrupt(self.path, f"unexpected end of file while reading '{name}'")
        # through numpy: its array holds a buffer export, so the mapping cannot be closed under a live view
        # (torch.frombuffer keeps no such hold)
        raw = torch.from_numpy(np.frombuffer(mapped, dtype=np.uint8, count=nbytes, offset=offset))
        return raw.view(info.dtype).reshape(shape)

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Drop the mapped pages of ``name`` (or of its rows) from this process (the page cache keeps them)."""
        _, offset, nbytes, _ = self._extent(name, rows)
        mapped = self._map
        if mapped is None or nbytes == 0:
            return
        page = mmap.PAGESIZE
        start = offset // page * page
        stop = min(len(mapped), -(-(offset + nbytes) // page) * page)
        with contextlib.suppress(ValueError, OSError):  # closed meanwhile: nothing mapped to drop
            mapped.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def _mapped(self) -> mmap.mmap:
        with self._lock:
            if self._map is None:
                if self._fd < 0:
                    raise CheckpointError(f"{self.path}: file already closed")
                self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
            return self._map
