"""A streamed tensor's inputs get their NaN/Inf probe once, and a poisoned row is still found."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from convergent.checkpoint import open_checkpoint
from convergent.engine import MergeJob, ModelInput, constant, execute, run_merge
from convergent.errors import MergeInputError
from convergent.strategies.bracket_select import _sample_runs

SHAPE = (3000, 700)


def _checkpoint(tmp_path, name, seed, poison_row=None):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(SHAPE, generator=g) * 0.02).to(torch.bfloat16)
    if poison_row is not None:
        w[poison_row, 3] = float("nan")
    save_file({"w": w}, tmp_path / f"{name}.safetensors")
    return open_checkpoint(tmp_path / f"{name}.safetensors")


def _ties_job(tmp_path, models, chunk_rows=600):
    return MergeJob(
        method="ties",
        base=_checkpoint(tmp_path, "base", 0),
        models=[ModelInput(m) for m in models],
        out_dir=tmp_path / "out",
        params=constant({"density": 0.5}),
        chunk_rows=chunk_rows,
    )


def test_each_row_is_probed_once_when_streamed(tmp_path, monkeypatch):
    probed: Counter[str] = Counter()
    original = execute._Executor._check_finite

    def counting(raw, src, name):
        probed[src.label] += raw.numel()
        return original(raw, src, name)

    monkeypatch.setattr(execute._Executor, "_check_finite", staticmethod(counting))
    job = _ties_job(tmp_path, [_checkpoint(tmp_path, "a", 1), _checkpoint(tmp_path, "b", 2)])
    run_merge(job)  # streamed: ties reads every chunk twice (the top-k pass, then the merge)
    # every element once, plus the rows the top-k selection samples before its pass (read ahead of it)
    sampled = sum(stop - start for start, stop in _sample_runs(SHAPE)) * SHAPE[1]
    assert len(probed) == 3
    assert set(probed.values()) == {SHAPE[0] * SHAPE[1] + sampled}


@pytest.mark.parametrize("row", [0, 1799, 2999])
def test_a_poisoned_row_of_a_streamed_tensor_is_found(tmp_path, row):
    job = _ties_job(tmp_path, [_checkpoint(tmp_path, "a", 1), _checkpoint(tmp_path, "b", 2, poison_row=row)])
    with pytest.raises(MergeInputError, match=r"'w' in .*b\.safetensors contains NaN or Inf"):
        run_merge(job)
    assert not (tmp_path / "out").exists()
