"""Content-addressed blobs: hashing, dedup, row reads, verified installs."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convergent.errors import IntegrityError, StoreError
from convergent.store import Store
from convergent.store.blobs import BlobStore, blob_header, tensor_digest

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool, torch.uint8]


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_roundtrip_and_row_reads(dtype: torch.dtype, shape: tuple[int, ...], seed: int, data) -> None:
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=gen) * 10).to(dtype)
    with tempfile.TemporaryDirectory() as d:
        blobs = BlobStore(Path(d) / "blobs", Path(d) / "tmp")
        digest = blobs.put_tensor(t)
        assert digest == tensor_digest(t)
        # the digest is the sha256 of the whole file: header (dtype, shape) + bytes
        assert hashlib.sha256(blobs.path(digest).read_bytes()).hexdigest() == digest
        back = blobs.read(digest)
        assert back.dtype == t.dtype and tuple(back.shape) == tuple(t.shape)
        assert torch.equal(back, t)
        if len(shape) >= 1:
            start = data.draw(st.integers(0, shape[0]))
            stop = data.draw(st.integers(start, shape[0]))
            assert torch.equal(blobs.read(digest, (start, stop)), t[start:stop])
        assert blobs.verify(digest) is None
        assert list(blobs) == [digest]
        assert not list(blobs.tmp_dir.iterdir())


def test_dtype_and_shape_are_part_of_the_hash(tmp_path: Path) -> None:
    a = torch.zeros(4, dtype=torch.float32)
    assert tensor_digest(a) != tensor_digest(a.view(torch.int32))
    assert tensor_digest(a) != tensor_digest(a.reshape(2, 2))
    assert tensor_digest(a) == tensor_digest(torch.zeros(4))


def test_dedup_writes_each_tensor_once(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", tmp_path / "tmp")
    t = torch.arange(12.0).reshape(3, 4)
    d1 = blobs.put_tensor(t)
    mtime = blobs.path(d1).stat().st_mtime_ns
    d2 = blobs.put_tensor(t.clone())
    assert d1 == d2 and blobs.path(d1).stat().st_mtime_ns == mtime
    assert blobs.missing([d1, "0" * 64, d1]) == ["0" * 64]


def test_put_file_verifies_and_refuses_without_keeping(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", tmp_path / "tmp")
    t = torch.arange(6.0)
    good = blob_header("float32", (6,)) + t.numpy().tobytes()
    digest = hashlib.sha256(good).hexdigest()
    tmp = blobs.new_temp_path("dl")
    tmp.write_bytes(good[:-1] + b"\x01")
    with pytest.raises(IntegrityError):
        blobs.put_file(tmp, digest)
    assert not tmp.exists() and not blobs.has(digest)
    # bytes that hash right but are not a blob
    junk = b"hello"
    tmp.write_bytes(junk)
    with pytest.raises(IntegrityError):
        blobs.put_file(tmp, hashlib.sha256(junk).hexdigest())
    assert not list(blobs)
    tmp.write_bytes(good)
    assert blobs.put_file(tmp, digest) == blobs.path(digest)
    assert torch.equal(blobs.read(digest), t)
    tmp.write_bytes(good)  # already present: just dropped
    blobs.put_file(tmp, digest)
    assert not tmp.exists()


def test_bad_digests_and_corruption(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", tmp_path / "tmp")
    for bad in ("../../etc/passwd", "ABC", "g" * 64, "a" * 63):
        with pytest.raises(StoreError):
            blobs.path(bad)
    d = blobs.put_tensor(torch.ones(5))
    p = blobs.path(d)
    os.chmod(p, 0o644)
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))
    assert blobs.verify(d) == "content does not match its hash"
    with pytest.raises(StoreError):
        blobs.read("0" * 64)


def test_temp_files_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        stale = store.tmp_dir / "w-999999999-abc.part"
        stale.write_bytes(b"x")
        mine = store.blobs.new_temp_path("w")
        mine.write_bytes(b"y")
        other = store.tmp_dir / "download-of-a-node.part"
        other.write_bytes(b"z")
    with Store.open(tmp_path / "s"):
        assert not stale.exists() and mine.exists() and other.exists()


def test_store_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store"):
        Store.open(tmp_path / "nothing", create=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError):
        Store.open(tmp_path / "file")


def test_default_store_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERGENT_HOME", str(tmp_path / "home"))
    with Store.open() as s:
        assert s.path == (tmp_path / "home").resolve()
    monkeypatch.delenv("CONVERGENT_HOME")
    monkeypatch.chdir(tmp_path)
    with Store.open() as s:
        assert s.path == (tmp_path / ".convergent").resolve()
