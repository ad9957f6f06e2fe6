"""Per-model statistics reach strategies through the engine, checked against the weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from convergent.checkpoint import open_checkpoint
from convergent.engine import MergeJob, ModelInput, constant, run_merge
from convergent.errors import MergeInputError


def make(tmp_path, name, tensors):
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path)
    return open_checkpoint(path)


def test_fisher_statistics_weight_the_merge_even_when_streamed(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(3000, 700, generator=g), "b": torch.randn(7, generator=g)}
    b = {"w": torch.randn(3000, 700, generator=g), "b": torch.randn(7, generator=g)}
    fa = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in a.items()}
    fb = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in b.items()}
    models = [
        ModelInput(make(tmp_path, "a", a), statistics={"fisher": make(tmp_path, "fa", fa)}),
        ModelInput(make(tmp_path, "b", b), statistics={"fisher": make(tmp_path, "fb", fb)}),
    ]
    outputs = []
    for chunk_rows in (None, 600):
        job = MergeJob(
            method="fisher",
            models=models,
            out_dir=tmp_path / f"out{chunk_rows}",
            params=constant({}),
            chunk_rows=chunk_rows,
        )
        run_merge(job)
        outputs.append(open_checkpoint(job.out_dir).read("w"))
    assert torch.equal(outputs[0], outputs[1])
    eps = 1e-8
    expected = ((fa["w"] + eps) * a["w"] + (fb["w"] + eps) * b["w"]) / (fa["w"] + fb["w"] + 2 * eps)
    torch.testing.assert_close(outputs[0], expected, rtol=1e-5, atol=1e-6)


def test_statistics_of_the_wrong_shape_are_refused_before_writing(tmp_path):
    a = {"w": torch.randn(40, 8)}
    wrong = {"w": torch.rand(80, 8)}  # twice the rows: would slice silently without the check
    models = [
        ModelInput(make(tmp_path, "a", a), statistics={"fisher": make(tmp_path, "fa", wrong)}),
        ModelInput(make(tmp_path, "b", {"w": torch.randn(40, 8)}), statistics={"fisher": make(tmp_path, "fb", wrong)}),
    ]
    job = MergeJob(method="fisher", models=models, out_dir=tmp_path / "out")
    with pytest.raises(MergeInputError, match=r"fisher statistics for tensor 'w' .* shape \[80, 8\]"):
        run_merge(job)
    assert not (tmp_path / "out").exists()
