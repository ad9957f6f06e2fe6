"""The pre-planned writer produces files the safetensors library reads back exactly."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from convergent.checkpoint import AtomicOutput, ShardedWriter, TensorInfo, open_checkpoint
from convergent.errors import OutputError

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool, torch.float64]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-100, 100, shape, generator=gen).to(dtype)


@settings(max_examples=25, deadline=None)
@given(
    specs=st.lists(
        st.tuples(
            st.sampled_from(DTYPES),
            st.lists(st.integers(0, 7), min_size=0, max_size=3),
        ),
        min_size=1,
        max_size=8,
    ),
    shard=st.integers(1, 400),
    seed=st.integers(0, 10),
)
def test_written_files_read_back_exactly_in_any_write_order(tmp_path_factory, specs, shard, seed):
    folder = tmp_path_factory.mktemp("w")
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": random_tensor(d, tuple(s), gen) for i, (d, s) in enumerate(specs)}
    writer = ShardedWriter(folder, [(n, TensorInfo(t.dtype, tuple(t.shape))) for n, t in tensors.items()], shard)
    order = list(tensors)
    random.Random(seed).shuffle(order)
    for name in order:  # rows written in two halves, out of order
        t = tensors[name]
        if t.dim() >= 1 and t.shape[0] > 1:
            half = t.shape[0] // 2
            writer.write(name, t[half:], half)
            writer.write(name, t[:half], 0)
        else:
            writer.write(name, t)
    writer.close()
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(files) > 1:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    seen = {}
    for fname in files:
        with safe_open(folder / fname, framework="pt") as f:
            names = f.keys()  # safe_open is not iterable in safetensors >= 0.8
            for key in names:
                seen[key] = f.get_tensor(key)
    assert set(seen) == set(tensors)
    for name, t in tensors.items():
        assert seen[name].dtype == t.dtype and torch.equal(seen[name], t)
    ckpt = open_checkpoint(folder)
    for name, t in tensors.items():
        assert torch.equal(ckpt.read(name), t)


def test_row_range_reads(tmp_path):
    t = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    save_file({"w": t, "s": torch.tensor(3.0)}, tmp_path / "x.safetensors")
    ckpt = open_checkpoint(tmp_path / "x.safetensors")
    assert torch.equal(ckpt.read("w", (3, 7)), t[3:7])
    assert torch.equal(ckpt.read("s"), torch.tensor(3.0))
    assert ckpt.info("w") == TensorInfo(torch.float32, (10, 6))


def test_peft_adapter_folder_is_recognised(tmp_path):
    save_file({"base_model.model.q.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.kind == "peft"
    assert "adapter_config.json" in ckpt.files()


def test_atomic_output_replaces_only_on_commit(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("old")
    with pytest.raises(OutputError):
        AtomicOutput(dest, overwrite=False)
    out = AtomicOutput(dest, overwrite=True)
    (out.tmp / "new").write_text("new")
    assert (dest / "old").exists()
    out.commit()
    assert not (dest / "old").exists() and (dest / "new").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
