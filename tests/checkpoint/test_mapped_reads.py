"""Mapped reads (``SafetensorsFile.view``): same values as ``read``, never write the file, memory given back."""

from __future__ import annotations

import json
import struct

import psutil
import pytest
import torch
from safetensors.torch import save_file

from convergent.checkpoint import open_checkpoint
from convergent.checkpoint.safetensors_file import SafetensorsFile

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8, torch.bool]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(len(shape) + shape[0])
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-100, 100, shape, generator=gen).to(dtype)


def test_views_hold_the_same_values_as_reads(tmp_path):
    tensors = {f"t{i}": _tensor(d, (37, 5 + i)) for i, d in enumerate(DTYPES)}
    tensors["scalar"] = torch.tensor(3.5)
    save_file(tensors, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    try:
        for name, expected in tensors.items():
            whole = f.view(name)
            assert whole is not None and torch.equal(whole, expected) and torch.equal(f.read(name), expected)
            if expected.dim():
                assert torch.equal(f.view(name, (3, 20)), expected[3:20])
                assert torch.equal(f.view(name, (3, 20)), f.read(name, (3, 20)))
    finally:
        f.close()


def test_writing_into_a_view_never_reaches_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(12.0).reshape(3, 4)}, path)
    before = path.read_bytes()
    ckpt = open_checkpoint(path)
    try:
        view = ckpt.view("w")
        view.fill_(-1.0)  # copy-on-write: private to this process
        assert torch.equal(ckpt.read("w"), torch.arange(12.0).reshape(3, 4))
        ckpt.release("w")  # private pages dropped: the view shows the file again
        assert torch.equal(view, torch.arange(12.0).reshape(3, 4))
    finally:
        ckpt.close()
    assert path.read_bytes() == before


def test_release_gives_the_mapped_pages_back(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.ones(1024, 1 << 14)}, path)  # 64 MB, 64 kB rows
    proc = psutil.Process()
    f = SafetensorsFile(path)
    try:
        view = f.view("w")
        resident_before = proc.memory_info().rss
        assert float(view.sum()) == 1 << 24  # touches every page
        touched = proc.memory_info().rss - resident_before
        f.release("w", (0, 512))  # the first half's rows (streaming releases chunk by chunk)
        half = proc.memory_info().rss - resident_before
        f.release("w")
        released = proc.memory_info().rss - resident_before
        assert touched > 48 << 20, touched
        assert 16 << 20 < half < 48 << 20, half
        assert released < 16 << 20, released
        assert float(view.sum()) == 1 << 24  # still valid: pages come back from the page cache
    finally:
        f.close()


def test_misaligned_tensors_are_read_instead_of_mapped(tmp_path):
    # a hand-written file whose float32 data starts at an odd offset (the format does not forbid it)
    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, len(data)]}}).encode()
    header += b" " * ((8 - len(header) % 8) % 8 + 1)  # data starts at 8 + len(header): odd
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    ckpt = open_checkpoint(path)
    try:
        assert ckpt.view("w") is None
        assert torch.equal(ckpt.read("w"), torch.arange(6, dtype=torch.float32).reshape(2, 3))
    finally:
        ckpt.close()


def test_closing_with_live_views_keeps_them_valid(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(8.0)}, path)
    f = SafetensorsFile(path)
    view = f.view("w")
    f.close()  # the mapping outlives the file object while a view uses it
    assert torch.equal(view, torch.arange(8.0))
    with pytest.raises(Exception, match="closed"):
        f.view("w")
