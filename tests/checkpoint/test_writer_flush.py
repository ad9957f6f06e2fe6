"""Preallocation and background writeback in the writer never change the bytes, and never lose an error.

The background fdatasync serves buffered shards; the tests that watch it turn
direct writes off (``buffered``), since direct shards have nothing to flush.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from convergent import durable
from convergent.checkpoint import AtomicOutput, ShardedWriter, TensorInfo, open_checkpoint
from convergent.checkpoint import writer as writer_module
from convergent.checkpoint.direct_io import open_direct
from convergent.errors import OutputError

SHAPES = {f"t{i:02d}": (37 + 11 * i, 24) for i in range(12)}  # 3-13 KB each
SHARD = 30_000  # so a few shards, each many times FLUSH_BYTES below


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        dtype = [torch.float32, torch.bfloat16, torch.float16][i % 3]
        out[name] = torch.randn(shape, generator=gen).to(dtype)
    return out


def plan(ts: dict[str, torch.Tensor]) -> list[tuple[str, TensorInfo]]:
    return [(n, TensorInfo(t.dtype, tuple(t.shape))) for n, t in ts.items()]


def write_all(writer: ShardedWriter, ts: dict[str, torch.Tensor], seed: int = 0) -> None:
    """Rows in chunks of 5, in a random order, from 4 threads."""
    jobs = [(n, start) for n, t in ts.items() for start in range(0, t.shape[0], 5)]
    random.Random(seed).shuffle(jobs)
    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(lambda n, s: writer.write(n, ts[n][s : s + 5], s), n, s) for n, s in jobs]:
            f.result()


def direct_io_supported(folder: Path) -> bool:
    fd = open_direct(folder / ".probe")
    if fd is not None:
        os.close(fd)
    (folder / ".probe").unlink(missing_ok=True)
    return fd is not None


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def buffered(monkeypatch):
    monkeypatch.setattr(writer_module, "DIRECT_IO", False)


@pytest.fixture
def flushing(monkeypatch, buffered):
    monkeypatch.setattr(durable, "DURABLE", True)
    monkeypatch.setattr(writer_module, "FLUSH_BYTES", 4096)


def test_flushed_output_is_byte_identical_and_exactly_sized(tmp_path, monkeypatch, flushing):
    ts = tensors()
    written = {}
    runs = (("flushed", True, False, 1), ("plain", False, False, 2), ("direct", True, True, 3))
    for label, durable_, direct, seed in runs:
        monkeypatch.setattr(durable, "DURABLE", durable_)
        monkeypatch.setattr(writer_module, "DIRECT_IO", direct)
        folder = tmp_path / label
        folder.mkdir()
        writer = ShardedWriter(folder, plan(ts), max_shard_size=SHARD)
        assert (writer._flusher is not None) is durable_
        assert bool(writer._direct) is (direct and direct_io_supported(tmp_path))
        write_all(writer, ts, seed)
        writer.close()
        written[label] = files(folder)
    sizes: dict[str, int] = {}
    for place in writer.placements.values():
        sizes[place.file] = sizes.get(place.file, 0) + place.info.nbytes
    assert written["flushed"] == written["plain"] == written["direct"] and len(written["flushed"]) > 2
    ckpt = open_checkpoint(tmp_path / "direct")
    for name, t in ts.items():
        assert torch.equal(ckpt.read(name), t)
    for name, size in sizes.items():  # header + data, nothing more
        data = written["direct"][name]
        assert len(data) == 8 + int.from_bytes(data[:8], "little") + size


def test_flusher_runs_only_on_open_files_and_stops_at_close(tmp_path, monkeypatch, flushing):
    real_fdatasync, real_close = os.fdatasync, os.close
    closed: set[int] = set()
    calls: list[int] = []
    ran = threading.Event()

    def fdatasync(fd):
        assert fd not in closed, "fdatasync on a closed fd"
        calls.append(fd)
        real_fdatasync(fd)
        ran.set()

    def close(fd):
        closed.add(fd)
        real_close(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "close", close)
    ts = tensors()
    writer = ShardedWriter(tmp_path, plan(ts), max_shard_size=SHARD)
    fds = set(writer._fds.values())
    write_all(writer, ts)
    assert ran.wait(30)
    writer.close()
    assert calls and set(calls) <= fds and fds <= closed
    assert not writer._flusher._thread.is_alive()
    count = len(calls)
    writer._flusher.request(next(iter(fds)), "x")  # ignored once stopped
    assert len(calls) == count and writer._flusher._thread is not None


def test_flusher_is_not_started_without_enough_bytes(tmp_path, monkeypatch, buffered):
    monkeypatch.setattr(durable, "DURABLE", True)
    ts = tensors()
    writer = ShardedWriter(tmp_path, plan(ts), max_shard_size=SHARD)
    write_all(writer, ts)
    writer.close()
    assert writer._flusher._thread is None


def test_fdatasync_failure_surfaces_from_write_and_close(tmp_path, monkeypatch, flushing):
    def fdatasync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    ts = tensors()
    writer = ShardedWriter(tmp_path, plan(ts), max_shard_size=1 << 30)
    writer.write("t00", ts["t00"])  # 3.5 KB: below FLUSH_BYTES
    assert writer._flusher._thread is None
    writer.write("t01", ts["t01"])  # crosses it: one request, which fails
    writer._flusher._thread.join(30)
    with pytest.raises(OutputError, match=r"model\.safetensors") as info:
        writer.write("t02", ts["t02"])
    assert info.value.__cause__.errno == errno.EIO
    with pytest.raises(OutputError, match=r"model\.safetensors"):
        writer.close()
    assert writer._fds == {}


@pytest.mark.parametrize("direct", [False, True])
def test_unsupported_fallocate_falls_back_to_a_sparse_file(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(writer_module, "DIRECT_IO", direct)
    ts = tensors()
    (tmp_path / "ok").mkdir()
    writer = ShardedWriter(tmp_path / "ok", plan(ts), SHARD)
    write_all(writer, ts)
    writer.close()

    def unsupported(fd, size):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(durable, "fallocate", unsupported)
    (tmp_path / "sparse").mkdir()
    writer = ShardedWriter(tmp_path / "sparse", plan(ts), SHARD)
    write_all(writer, ts, seed=3)
    writer.close()
    assert files(tmp_path / "sparse") == files(tmp_path / "ok")


def test_preallocate_sets_the_exact_size(tmp_path, monkeypatch):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"head", 0)
        durable.preallocate(fd, 12_345)
        assert os.fstat(fd).st_size == 12_345
        monkeypatch.setattr(durable, "_libc_fallocate", None)
        monkeypatch.setattr(durable, "libc", lambda: None)  # no C library (not Linux): ftruncate only
        assert durable.preallocate(fd, 20_000) is False
        assert os.fstat(fd).st_size == 20_000
        assert os.pread(fd, 4, 0) == b"head"
    finally:
        os.close(fd)


def test_no_disk_space_fails_before_any_write_and_leaves_no_folder(tmp_path, monkeypatch):
    real = durable.fallocate
    calls = []

    def full(fd, size):
        calls.append(size)
        if len(calls) == 2:  # the first shard fits, the second does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, size)

    monkeypatch.setattr(durable, "fallocate", full)
    open_fds = len(os.listdir("/proc/self/fd"))
    ts = tensors()
    dest = tmp_path / "out"
    message = r"not enough disk space for the output: need \d+ bytes in"
    with pytest.raises(OutputError, match=message) as info, AtomicOutput(dest, overwrite=False) as out:
        ShardedWriter(out.tmp, plan(ts), max_shard_size=SHARD)
        pytest.fail("writer created on a full disk")
    assert info.value.hint == "free space or choose another output folder"
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []
    assert len(os.listdir("/proc/self/fd")) == open_fds


@pytest.mark.parametrize("direct", [True, False])
def test_a_shard_that_cannot_be_created_is_one_clear_error(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(writer_module, "DIRECT_IO", direct)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_module, "open_direct", full)
    if not direct:
        monkeypatch.setattr(writer_module.os, "open", full)
    open_fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OutputError, match=r"could not write .*model\.safetensors: No space left on device"):
        ShardedWriter(tmp_path, plan(tensors()), max_shard_size=1 << 30)
    assert len(os.listdir("/proc/self/fd")) == open_fds
