"""Content-addressed tensor blobs: one file per distinct tensor, named by its hash.

A blob file is self-describing, so its digest can be checked from the file
alone (by ``fsck``, by a node receiving it, by an importer)::

    b"cvblob1\\n" | u64 little-endian header length | header | raw bytes

where the header is the canonical JSON ``{"dtype": "bfloat16", "shape": [..]}``
and the raw bytes are the tensor in C order, little-endian. The digest is the
sha256 of the whole file, i.e. of dtype + shape + raw bytes. Identical
tensors get the same digest and are stored once across every contribution
and set. Non-tensor files (config.json, tokenizers) are stored as uint8
blobs of shape [n].

Every write goes to a temporary file in the store, is fsynced, and is renamed
into ``blobs/ab/cdef...``; a blob path either does not exist or holds the
complete, verified bytes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from convergent.durable import DURABLE, fsync_dir, sha256_file
from convergent.errors import IntegrityError, StoreError
from convergent.sets.canonical import HEX64, canonical_json

if TYPE_CHECKING:  # torch is imported lazily: status/log/fsck stay fast to start
    import torch

MAGIC = b"cvblob1\n"
_PREFIX = len(MAGIC) + 8
_MAX_HEADER = 1 << 16
#: Bytes read or written per step when streaming blobs.
IO_CHUNK = 8 << 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: Bytes per element of every dtype a blob may hold.
ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in ITEMSIZE:
        raise StoreError(f"unsupported tensor dtype '{name}'")
    return getattr(torch, name)


def dtype_itemsize(name: str) -> int:
    try:
        return ITEMSIZE[name]
    except KeyError:
        raise StoreError(f"unsupported tensor dtype '{name}'") from None


def blob_header(dtype: str, shape: tuple[int, ...] | list[int]) -> bytes:
    """The bytes that precede a tensor's data in its blob file."""
    header = canonical_json({"dtype": dtype, "shape": list(shape)})
    return MAGIC + struct.pack("<Q", len(header)) + header


@functools.lru_cache(maxsize=4096)
def _header_len(dtype: str, shape: tuple[int, ...]) -> int:
    return len(blob_header(dtype, shape))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian C-order bytes of ``t`` (no copy when contiguous)."""
    import torch

    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_digest(t: torch.Tensor) -> str:
    """The blob digest ``t`` would get, without writing anything."""
    h = hashlib.sha256(blob_header(dtype_name(t.dtype), tuple(t.shape)))
    h.update(tensor_bytes(t))
    return h.hexdigest()


def parse_header(f: BinaryIO) -> tuple[str, tuple[int, ...], int]:
    """(dtype, shape, data offset) of an open blob file; IntegrityError if malformed."""
    prefix = f.read(_PREFIX)
    if len(prefix) != _PREFIX or prefix[: len(MAGIC)] != MAGIC:
        raise IntegrityError("not a convergent blob (bad magic)")
    (hlen,) = struct.unpack("<Q", prefix[len(MAGIC) :])
    if hlen > _MAX_HEADER:
        raise IntegrityError("not a convergent blob (header too long)")
    import json

    try:
        header = json.loads(f.read(hlen))
        dtype, shape = header["dtype"], tuple(int(d) for d in header["shape"])
        dtype_itemsize(dtype)
    except (ValueError, KeyError, TypeError, StoreError) as exc:
        raise IntegrityError(f"not a convergent blob (bad header: {exc})") from None
    return dtype, shape, _PREFIX + hlen


class BlobWriter:
    """Streams one tensor's bytes into a temporary file while hashing them.

    ``finish()`` checks the length, and unless the blob already exists,
    fsyncs and renames it into place; it returns the digest. ``abort()``
    (or leaving a ``with`` block on an exception) deletes the temp file.
    """

    def __init__(self, store: BlobStore, dtype: str, shape: tuple[int, ...], digest: str | None = None):
        self._store = store
        #: Digest computed by the caller from these very bytes: skip hashing them again.
        self._known = digest
        self.dtype = dtype
        self.shape = tuple(shape)
        n = 1
        for d in self.shape:
            n *= d
        self.expected = n * dtype_itemsize(dtype)
        self.written = 0
        self._hash = hashlib.sha256() if digest is None else None
        self._tmp = store.new_temp_path("w")
        self._file: BinaryIO | None = open(self._tmp, "wb")  # noqa: SIM115
        self._write(blob_header(dtype, self.shape))
        self.digest: str | None = None

    def _write(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        if self._hash is not None:
            self._hash.update(data)
        self._file.write(data)

    def write(self, data: bytes | memoryview | torch.Tensor) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = tensor_bytes(data)
        self.written += len(data)
        if self.written > self.expected:
            raise StoreError(f"blob got more bytes than its shape {list(self.shape)} holds")
        self._write(data)

    def finish(self, sync: bool = True) -> str:
        """Install the blob. The file is always fsynced before its rename; ``sync=False``
        defers the directory fsync to ``BlobStore.sync()`` (batching many blobs)."""
        if self.written != self.expected:
            self.abort()
            raise StoreError(f"blob got {self.written} bytes, its shape needs {self.expected}")
        digest = self._hash.hexdigest() if self._hash is not None else self._known
        assert self._file is not None and digest is not None
        target = self._store.path(digest)
        if target.exists():
            self._file.close()
            self._file = None
            os.unlink(self._tmp)
        else:
            self._file.flush()
            if DURABLE:
                os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self._store._install(self._tmp, digest, sync=sync)
        self.digest = digest
        return digest

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None or self.digest is None:
            self.abort()


class BlobStore:
    """The ``blobs/`` directory of a store: put, check and read blobs by digest."""

    def __init__(self, root: Path, tmp_dir: Path):
        self.root = root
        self.tmp_dir = tmp_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        #: Directories whose renames still need an fsync (see ``sync``).
        self._dirty_dirs: set[Path] = set()
        self._lock = threading.Lock()
        #: Per-thread cache of open read-only blob descriptors (chunked reads of one tensor reuse it).
        self._local = threading.local()

    # -- names -----------------------------------------------------------
    def path(self, digest: str) -> Path:
        """Where blob ``digest`` lives (it may not exist); ValueError for a non-digest."""
        if not isinstance(digest, str) or not HEX64.match(digest):
            raise StoreError(f"'{digest}' is not a blob digest (64 lowercase hex characters)")
        return self.root / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests among ``digests`` not stored here, sorted, without duplicates."""
        return sorted({d for d in digests if not self.has(d)})

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def __iter__(self) -> Iterator[str]:
        """Every stored digest, sorted."""
        out = []
        if self.root.is_dir():
            for sub in self.root.iterdir():
                if sub.is_dir() and len(sub.name) == 2:
                    for f in sub.iterdir():
                        d = sub.name + f.name
                        if HEX64.match(d):
                            out.append(d)
        return iter(sorted(out))

    def new_temp_path(self, prefix: str = "w") -> Path:
        """A fresh path in the store's temp dir (same filesystem as the blobs)."""
        return self.tmp_dir / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex}.part"

    # -- writes ----------------------------------------------------------
    def _install(self, tmp: Path, digest: str, sync: bool) -> Path:
        target = self.path(digest)
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp, target)
        if sync:
            fsync_dir(target.parent)
        else:
            with self._lock:
                self._dirty_dirs.add(target.parent)
        return target

    def sync(self) -> None:
        """fsync the directories of renames done with ``sync=False``."""
        with self._lock:
            dirs, self._dirty_dirs = sorted(self._dirty_dirs), set()
        for d in dirs:
            fsync_dir(d)

    def writer(self, dtype: str, shape: tuple[int, ...], digest: str | None = None) -> BlobWriter:
        """Stream a tensor of ``dtype``/``shape`` into a new blob (see :class:`BlobWriter`).

        ``digest``: the caller already hashed exactly these bytes (``tensor_digest``); trust it.
        """
        return BlobWriter(self, dtype, shape, digest)

    def put_tensor(self, t: torch.Tensor, sync: bool = True) -> str:
        """Store ``t`` (dedup: nothing is written if it exists); returns its digest."""
        digest = tensor_digest(t)
        if self.has(digest):
            return digest
        with self.writer(dtype_name(t.dtype), tuple(t.shape), digest) as w:
            w.write(t)
            return w.finish(sync=sync)

    def put_bytes(self, data: bytes, sync: bool = True) -> str:
        """Store a non-tensor file's bytes as a uint8 blob; returns its digest."""
        with self.writer("uint8", (len(data),)) as w:
            w.write(memoryview(data))
            return w.finish(sync=sync)

    def put_file(self, tmp_path: str | Path, expected_digest: str, sync: bool = True) -> Path:
        """Move a complete blob file (e.g. a finished download) into the store.

        The file is re-hashed; if it does not hash to ``expected_digest`` or is
        not a blob, it is deleted and IntegrityError is raised (nothing kept).
        Otherwise it is fsynced and atomically renamed into place (or simply
        deleted when the blob already exists). ``tmp_path`` should be on the
        store's filesystem (use :meth:`new_temp_path` or ``store.tmp_dir``).
        """
        tmp = Path(tmp_path)
        target = self.path(expected_digest)
        try:
            actual = sha256_file(tmp)
            if actual != expected_digest:
                raise IntegrityError(
                    f"blob {expected_digest[:12]}… does not match its hash (got {actual[:12]}…)",
                    "the sender's copy is corrupt; nothing was kept",
                )
            with open(tmp, "rb") as f:
                dtype, shape, offset = parse_header(f)
            n = 1
            for d in shape:
                n *= d
            if tmp.stat().st_size != offset + n * dtype_itemsize(dtype):
                raise IntegrityError(f"blob {expected_digest[:12]}… has a wrong length for its shape")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if target.exists():
            tmp.unlink()
            return target
        if DURABLE:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self._install(tmp, expected_digest, sync=sync)

    # -- reads -----------------------------------------------------------
    def header(self, digest: str) -> tuple[str, tuple[int, ...], int]:
        """(dtype, shape, data offset) of a stored blob."""
        try:
            with open(self.path(digest), "rb") as f:
                return parse_header(f)
        except FileNotFoundError:
            raise StoreError(f"blob {digest[:12]}… is missing from the store", "run 'convergent fsck'") from None

    def read(self, digest: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor in blob ``digest``, or only rows [start, stop) of dim 0, read from disk."""
        import torch

        path = self.path(digest)
        try:
            f = open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise StoreError(f"blob {digest[:12]}… is missing from the store", "run 'convergent fsck'") from None
        with f:
            dtype_s, shape, offset = parse_header(f)
            dtype = torch_dtype(dtype_s)
            row_elems = 1
            for d in shape[1:]:
                row_elems *= d
            if rows is None or len(shape) == 0:
                start, stop, out_shape = 0, (shape[0] if shape else 1), shape
            else:
                start, stop = rows
                if not 0 <= start <= stop <= shape[0]:
                    raise StoreError(f"rows {rows} out of range for a tensor of shape {list(shape)}")
                out_shape = (stop - start, *shape[1:])
            nbytes = (stop - start) * row_elems * dtype.itemsize
            if nbytes == 0:
                return torch.empty(out_shape, dtype=dtype)
            f.seek(offset + start * row_elems * dtype.itemsize)
            buf = bytearray(nbytes)
            got = f.readinto(buf)
            if got != nbytes:
                raise IntegrityError(f"blob {digest[:12]}… is truncated", "run 'convergent fsck'")
            return torch.frombuffer(buf, dtype=dtype).reshape(out_shape)

    def read_known(
        self,
        digest: str,
        dtype: str,
        shape: tuple[int, ...],
        rows: tuple[int, int] | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Like :meth:`read` for a blob whose dtype and shape are known (from a manifest).

        The data offset follows from the canonical header, so this is one
        positional read straight into a fresh tensor, or into ``out`` (see
        ``TensorSource.read``), with no header parse and no zero fill.
        """
        from convergent.checkpoint.source import read_buffer, read_exact

        tdtype = torch_dtype(dtype)
        offset = _header_len(dtype, tuple(shape))
        row_elems = 1
        for d in shape[1:]:
            row_elems *= d
        if rows is None or len(shape) == 0:
            start, stop, out_shape = 0, (shape[0] if shape else 1), tuple(shape)
        else:
            start, stop = rows
            if not 0 <= start <= stop <= shape[0]:
                raise StoreError(f"rows {rows} out of range for a tensor of shape {list(shape)}")
            out_shape = (stop - start, *shape[1:])
        itemsize = tdtype.itemsize
        nbytes = (stop - start) * row_elems * itemsize
        buf = read_buffer(out, nbytes)
        if nbytes:
            fd = self._fds().get(digest, self.path(digest))
            if not read_exact(fd, buf, offset + start * row_elems * itemsize):
                raise IntegrityError(f"blob {digest[:12]}… is truncated", "run 'convergent fsck'")
        return buf.view(tdtype).reshape(out_shape)

    def _fds(self) -> _FdCache:
        cache = getattr(self._local, "fds", None)
        if cache is None:
            cache = self._local.fds = _FdCache()
        return cache

    def read_bytes(self, digest: str) -> bytes:
        """The payload of a uint8 file blob."""
        with open(self.path(digest), "rb") as f:
            _, _, offset = parse_header(f)
            f.seek(offset)
            return f.read()

    def verify(self, digest: str) -> str | None:
        """None if blob ``digest`` is present and hashes to its name, else what is wrong."""
        path = self.path(digest)
        if not path.is_file():
            return "missing"
        if sha256_file(path) != digest:
            return "content does not match its hash"
        try:
            with open(path, "rb") as f:
                dtype, shape, offset = parse_header(f)
        except IntegrityError as exc:
            return exc.message
        n = 1
        for d in shape:
            n *= d
        if path.stat().st_size != offset + n * dtype_itemsize(dtype):
            return "length does not match its shape"
        return None

    def clean_temp(self) -> int:
        """Delete temp files and folders of this module (``w-PID-…``) left by dead processes; returns how many."""
        import shutil

        removed = 0
        for f in self.tmp_dir.glob("w-*"):
            try:
                pid = int(f.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not _alive(pid):
                if f.is_dir():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink(missing_ok=True)
                removed += 1
        return removed


class _FdCache:
    """A few open read-only descriptors of one thread, least recently used closed first."""

    SIZE = 32

    def __init__(self) -> None:
        from collections import OrderedDict

        self._fds: OrderedDict[str, int] = OrderedDict()

    def get(self, digest: str, path: Path) -> int:
        fd = self._fds.get(digest)
        if fd is not None:
            self._fds.move_to_end(digest)
            return fd
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"blob {digest[:12]}… is missing from the store", "run 'convergent fsck'") from None
        self._fds[digest] = fd
        if len(self._fds) > self.SIZE:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def __del__(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
