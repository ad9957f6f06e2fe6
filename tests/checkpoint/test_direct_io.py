"""Block-aligned writes give the same bytes as plain ones, whatever the ranges, their order and the threads."""

from __future__ import annotations

import errno
import itertools
import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convergent.checkpoint import ShardedWriter, TensorInfo, direct_io
from convergent.checkpoint.direct_io import ALIGN, BlockAlignedFile, WriteQueue, aligned_buffer, open_direct
from convergent.errors import OutputError


def split(size: int, cuts: list[int]) -> list[tuple[int, int]]:
    """Disjoint ranges covering [0, size) at the given cut points."""
    points = sorted({0, size, *(c % (size + 1) for c in cuts)})
    return list(itertools.pairwise(points))


def write_ranges(fd: int, payload: np.ndarray, ranges, align: int, staging: int, threads: int, seed: int) -> None:
    """Write ``ranges`` from ``threads`` threads: runs of consecutive ranges (as a streamed tensor's
    chunks arrive) in a random order, each run in order by one thread."""
    queue = WriteQueue(buffers=2, nbytes=staging, align=align)
    out = BlockAlignedFile(fd, len(payload), queue)
    rng = random.Random(seed)
    runs, ranges = [], list(ranges)
    while ranges:
        take = rng.randint(1, 4)
        runs.append(ranges[:take])
        ranges = ranges[take:]
    rng.shuffle(runs)

    def put(run):
        for a, b in run:
            if (a + b) % 3 == 0:  # sometimes from memory aligned to ``align``, sometimes as bytes
                src = aligned_buffer(b - a, align)
                src[:] = payload[a:b]
                out.write(a, src)
            else:
                out.write(a, payload[a:b].tobytes())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, runs))
    queue.finish()
    queue.close()
    assert out._partial == {}, "every block completes once its bytes are in, before close"
    out.close()


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 5000),
    cuts=st.lists(st.integers(0, 5000), max_size=40),
    align=st.sampled_from([8, 16, 64, 512]),
    stage_blocks=st.integers(1, 4),
    threads=st.sampled_from([1, 3]),
    seed=st.integers(0, 1000),
)
def test_any_ranges_in_any_order_give_the_file_exactly(
    tmp_path_factory, size, cuts, align, stage_blocks, threads, seed
):
    payload = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    path = tmp_path_factory.mktemp("aligned") / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        write_ranges(fd, payload, split(size, cuts), align, align * stage_blocks, threads, seed)
    finally:
        os.close(fd)
    assert path.read_bytes() == payload.tobytes()


def test_consecutive_writes_of_a_thread_go_out_as_one_run(tmp_path, monkeypatch):
    writes = []
    real = direct_io._pwrite_all
    monkeypatch.setattr(
        direct_io, "_pwrite_all", lambda fd, buf, off: (writes.append((off, len(buf))), real(fd, buf, off))
    )
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    queue = WriteQueue(buffers=2, nbytes=64, align=16)
    out = BlockAlignedFile(fd, 200, queue)
    for start in range(3, 200, 10):  # 10-byte pieces from byte 3 on, then the head
        out.write(start, bytes(range(start, min(start + 10, 200))))
    out.write(0, bytes(range(3)))
    queue.finish()
    queue.close()
    out.close()
    os.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(range(200))
    # runs of 64 bytes from block 0 (first and last blocks completed by gathering), not 20 small writes
    assert sorted(writes) == [(0, 16), (16, 48), (64, 64), (128, 64), (192, 16)]


def test_a_failed_write_is_raised_with_the_file_and_nothing_hangs(tmp_path, monkeypatch):
    def failing(fd, buf, off):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(direct_io, "_pwrite_all", failing)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    queue = WriteQueue(buffers=1, nbytes=64, align=16)
    out = BlockAlignedFile(fd, 1000, queue, label="shard-7")
    try:
        with pytest.raises(OutputError, match="could not write shard-7: Input/output error") as info:
            for start in range(0, 1000, 50):  # the failure surfaces from a later write or from finish
                out.write(start, bytes(50))
            queue.finish()
        assert info.value.__cause__.errno == errno.EIO
        with pytest.raises(OutputError, match="shard-7"):
            queue.finish()
    finally:
        queue.close()
        os.close(fd)
    assert queue._threads and not any(t.is_alive() for t in queue._threads)


def test_a_range_never_written_reads_as_zeros_and_the_size_is_kept(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    queue = WriteQueue(buffers=2, nbytes=32, align=16)
    out = BlockAlignedFile(fd, 100, queue)
    out.write(0, b"a" * 40)
    out.write(60, b"b" * 40)
    queue.finish()
    assert sorted(out._partial) == [2, 3]  # bytes 32-39 and 60-63 wait for their neighbours
    out.close()
    queue.close()
    os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"a" * 40 + bytes(20) + b"b" * 40


def test_writes_outside_the_file_are_refused(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        out = BlockAlignedFile(fd, 10, WriteQueue(nbytes=8, align=8))
        with pytest.raises(ValueError, match="outside a 10-byte file"):
            out.write(5, b"123456")
        with pytest.raises(ValueError, match="not a multiple"):
            WriteQueue(nbytes=12, align=8)
    finally:
        os.close(fd)


def test_aligned_buffer_is_aligned_and_zeroed():
    for align in (8, 512, ALIGN):
        buf = aligned_buffer(3 * align + 5, align)
        assert buf.ctypes.data % align == 0 and len(buf) == 3 * align + 5 and not buf.any()


def test_direct_writes_on_this_disk_give_the_same_bytes(tmp_path):
    """The real O_DIRECT path, with tensor-like ranges at odd offsets (or the reported fallback)."""
    size = 3 * direct_io.STAGING_BYTES + 12_345
    payload = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    fd = open_direct(tmp_path / "f")
    if fd is None:  # a filesystem without O_DIRECT (tmpfs on old kernels): the writer must use buffered files
        writer = ShardedWriter(tmp_path, [("t", TensorInfo(torch.float32, (3,)))], max_shard_size=1 << 30)
        writer.close()
        assert writer._direct == {}
        return
    try:
        cuts = [8 + 7 * i * 4099 for i in range(1, 40)] + [direct_io.STAGING_BYTES + 3, 2 * direct_io.STAGING_BYTES - 1]
        write_ranges(fd, payload, split(size, cuts), ALIGN, direct_io.STAGING_BYTES, 2, 0)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == payload.tobytes()


@pytest.mark.parametrize("where", ["open", "probe"])
def test_open_direct_reports_an_unsupported_filesystem(tmp_path, monkeypatch, where):
    real_open, real_pwrite = os.open, os.pwrite

    def fake_open(path, flags, mode=0o777):
        if where == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, mode)

    def fake_pwrite(fd, data, offset):
        if where == "probe":
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "pwrite", fake_pwrite)
    open_fds = len(os.listdir("/proc/self/fd"))
    assert open_direct(tmp_path / "f") is None
    assert len(os.listdir("/proc/self/fd")) == open_fds


def test_open_direct_raises_real_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_direct(tmp_path / "missing" / "f")
