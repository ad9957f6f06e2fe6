"""Write a sharded safetensors model whose layout is fixed before any tensor is computed.

Every output tensor's dtype and shape is known from the plan, so the shard
files, their headers and every tensor's byte offset are decided up front.
Tensors (or row chunks of them) are then written with ``os.pwrite`` as they
finish, in any order and from any thread: memory stays at one chunk, and the
bytes do not depend on scheduling. The ``safetensors`` library cannot do this
(it serialises whole in-memory dicts), hence this small writer; its output is
read back with ``safetensors`` in the tests.

Each file's space is reserved up front (so a full disk fails before any work).
Where the filesystem allows, shards are written with ``O_DIRECT`` (see
:mod:`convergent.checkpoint.direct_io`): the bytes go to the disk as they are
computed and never pass through the page cache. Elsewhere the writes are
buffered and a background thread fdatasyncs files as they fill, so the disk
writes still overlap the computation and the fsync at commit has little left
to do. ``CONVERGENT_DIRECT_IO=0`` forces the buffered path.

Everything goes into a temporary folder beside the destination, which is
renamed into place only when complete (see :class:`AtomicOutput`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from convergent import durable
from convergent.checkpoint.direct_io import BlockAlignedFile, WriteQueue, open_direct, write_error
from convergent.checkpoint.safetensors_file import DTYPE_NAMES
from convergent.checkpoint.source import TensorInfo
from convergent.determinism import row_numel
from convergent.durable import fsync_dir, fsync_file, preallocate
from convergent.errors import OutputError

#: Bytes written to one file between background fdatasync requests for it.
FLUSH_BYTES = 256 << 20
#: Write shards with O_DIRECT where the filesystem supports it.
DIRECT_IO = os.environ.get("CONVERGENT_DIRECT_IO") != "0"


@dataclass(frozen=True)
class Placement:
    """Where one tensor lives in the output."""

    file: str
    offset: int  # absolute byte offset in the file
    info: TensorInfo


def _shard_groups(tensors: list[tuple[str, TensorInfo]], max_shard_size: int) -> list[list[tuple[str, TensorInfo]]]:
    groups: list[list[tuple[str, TensorInfo]]] = [[]]
    size = 0
    for name, info in tensors:
        if groups[-1] and size + info.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append((name, info))
        size += info.nbytes
    return groups


def _header(group: list[tuple[str, TensorInfo]]) -> tuple[bytes, dict[str, int]]:
    # Largest itemsize first keeps every tensor aligned to its element size.
    ordered = sorted(group, key=lambda item: (-item[1].dtype.itemsize, item[0]))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    pos = 0
    for name, info in ordered:
        header[name] = {
            "dtype": DTYPE_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [pos, pos + info.nbytes],
        }
        offsets[name] = pos
        pos += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


class _Flusher:
    """One daemon thread that fdatasyncs files on request, while the writers go on.

    Without it the kernel holds the written pages until commit, which then waits
    for the whole output to reach the disk. Requests for the same fd coalesce,
    and a single thread means one fdatasync at a time. The first failure is kept
    in ``error`` (and flushing stops) for the writer to raise.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._pending: dict[int, str] = {}  # fd -> file name, in request order
        self._stopping = False
        self._thread: threading.Thread | None = None

    def request(self, fd: int, name: str) -> None:
        with self._cond:
            if self._stopping or self.error is not None:
                return
            self._pending[fd] = name
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="convergent-flush", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                fd = next(iter(self._pending))
                name = self._pending.pop(fd)
            try:
                os.fdatasync(fd)
            except Exception as exc:
                if isinstance(exc, OSError):
                    exc = write_error(str(self.folder / name), exc)
                with self._cond:
                    self.error = exc
                    self._pending.clear()
                return

    def stop(self) -> None:
        """Drop pending requests and wait for a running fdatasync: the fds may be closed after this."""
        with self._cond:
            self._stopping = True
            self._pending.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()


class ShardedWriter:
    """Pre-planned sharded safetensors output inside ``folder``."""

    def __init__(
        self,
        folder: Path,
        tensors: Iterable[tuple[str, TensorInfo]],
        max_shard_size: int,
        prefix: str = "model",
    ):
        items = sorted(tensors, key=lambda item: item[0])
        groups = _shard_groups(items, max_shard_size)
        count = len(groups)
        self.placements: dict[str, Placement] = {}
        self.file_names: list[str] = []
        self._fds: dict[str, int] = {}
        self._direct: dict[str, BlockAlignedFile] = {}
        self._queue: WriteQueue | None = None  # writes for every direct file, made with the first
        self.folder = folder
        self._flusher = _Flusher(folder) if durable.DURABLE else None
        self._unflushed: dict[str, int] = {}
        self._lock = threading.Lock()
        headers = [_header(group) for group in groups]
        need = sum(len(head) + sum(info.nbytes for _, info in group) for group, (head, _) in zip(groups, headers))
        weight_map = {}
        try:
            for i, (group, (head, offsets)) in enumerate(zip(groups, headers), start=1):
                fname = f"{prefix}.safetensors" if count == 1 else f"{prefix}-{i:05d}-of-{count:05d}.safetensors"
                size = len(head) + sum(info.nbytes for _, info in group)
                try:
                    fd = open_direct(folder / fname) if DIRECT_IO else None
                    direct = fd is not None
                    if fd is None:
                        fd = os.open(folder / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                except OSError as exc:
                    raise write_error(str(folder / fname), exc) from exc
                if direct:
                    self._queue = self._queue or WriteQueue()
                    self._direct[fname] = BlockAlignedFile(fd, size, self._queue, label=str(folder / fname))
                else:
                    self._unflushed[fname] = 0  # direct files have nothing for the flusher
                self._fds[fname] = fd
                self._reserve(fd, size, need)
                if fname in self._direct:
                    self._direct[fname].write(0, head)
                else:
                    os.pwrite(fd, head, 0)
                for name, info in group:
                    self.placements[name] = Placement(fname, len(head) + offsets[name], info)
                    weight_map[name] = fname
                self.file_names.append(fname)
        except BaseException:
            self.close()
            raise
        self.total_size = sum(info.nbytes for _, info in items)
        if count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            self.file_names.append(f"{prefix}.safetensors.index.json")

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Write ``tensor`` (already in the output dtype) as rows from ``row_start`` of ``name``."""
        place = self.placements[name]
        if tensor.dtype != place.info.dtype:
            raise TypeError(f"{name}: writing {tensor.dtype}, planned {place.info.dtype}")
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        offset = place.offset + row_start * row_numel(place.info.shape) * place.info.dtype.itemsize
        self._write_at(place.file, offset, memoryview(data))

    def _write_at(self, fname: str, offset: int, view: memoryview) -> None:
        direct = self._direct.get(fname)
        if direct is not None:  # written by the queue's threads, nothing left for the flusher
            direct.write(offset, view)
            return
        fd = self._fds[fname]
        flusher = self._flusher
        if flusher is not None and flusher.error is not None:
            raise flusher.error
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise write_error(str(self.folder / fname), exc) from exc
        if flusher is not None:
            with self._lock:
                pending = self._unflushed[fname] + done
                self._unflushed[fname] = 0 if pending >= FLUSH_BYTES else pending
            if pending >= FLUSH_BYTES:
                flusher.request(fd, fname)

    def _reserve(self, fd: int, size: int, need: int) -> None:
        try:
            preallocate(fd, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputError(
                    f"not enough disk space for the output: need {need} bytes in {self.folder}",
                    "free space or choose another output folder",
                ) from exc
            raise OutputError(
                f"cannot create {size} bytes of output in {self.folder}: {exc.strerror or exc}",
                "check that the output folder is writable, or choose another one",
            ) from exc

    def close(self) -> None:
        """Close the shards; :meth:`AtomicOutput.commit` makes them durable with the rest of the folder.

        The flusher is stopped and the direct writes drained first, so nothing
        runs on a closed (or reused) fd; a failure they hit is raised here, once
        the fds are closed.
        """
        if self._flusher is not None:
            self._flusher.stop()
        try:
            if self._queue is not None:
                try:
                    self._queue.finish()
                finally:
                    self._queue.close()
            for direct in self._direct.values():
                direct.close()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}
            self._direct = {}
        if self._flusher is not None and self._flusher.error is not None:
            raise self._flusher.error


class AtomicOutput:
    """A temporary folder that becomes ``dest`` only on :meth:`commit`.

    An existing ``dest`` is refused unless ``overwrite``; with it, the old
    folder is replaced only after the new one is complete. Any failure
    removes the temporary folder and leaves ``dest`` as it was.
    """

    def __init__(self, dest: Path, overwrite: bool):
        self.dest = Path(dest)
        self.overwrite = overwrite
        self.check()
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dest.parent / f".{self.dest.name}.partial-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()

    def check(self) -> None:
        if self.dest.exists() and not self.overwrite:
            if self.dest.is_dir() and not any(self.dest.iterdir()):
                return
            raise OutputError(f"{self.dest} already exists", "choose another output folder or pass --overwrite")
        if self.dest.exists() and not self.dest.is_dir():
            raise OutputError(f"{self.dest} exists and is not a folder", "choose another output path")

    def commit(self) -> None:
        self.check()
        old = None
        if self.dest.exists():
            old = self.dest.parent / f".{self.dest.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(self.dest, old)
        # Every file (shards, config, tokenizer, provenance) must be on disk before
        # the folder becomes visible: this is the one place outputs are fsynced.
        for path in self.tmp.iterdir():
            if path.is_file():
                fsync_file(path)
        fsync_dir(self.tmp)
        os.replace(self.tmp, self.dest)
        fsync_dir(self.dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
