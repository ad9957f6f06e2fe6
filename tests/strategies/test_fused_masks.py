"""DARE and DELLA through the fused mask kernels give the tensor path's bits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convergent.strategies import fused_kernels, kernels, merge_tensors, task_arithmetic


@pytest.fixture(autouse=True, scope="module")
def _loaded():
    kernels.load()


def family(shape, dtype, n, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    models = [base + 0.01 * torch.randn(shape, generator=gen) for _ in range(n)]
    if seed % 5 == 0:  # an exactly unchanged element and a negative delta that a zero mask keeps as -0.0
        models[0].view(-1)[0] = base.view(-1)[0]
    return base.to(dtype), [m.to(dtype) for m in models]


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(["dare_ties", "dare_linear", "della", "della_linear"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    rows=st.integers(1, 70),
    n=st.integers(1, 3),
    densities=st.lists(st.sampled_from([0.1, 0.5, 0.9, 1.0]), min_size=3, max_size=3),
    weights=st.lists(st.sampled_from([1.0, 0.3, -0.7]), min_size=3, max_size=3),
    rescale=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_fused_masked_deltas_equal_the_tensor_path(method, dtype, rows, n, densities, weights, rescale, seed):
    base, models = family((rows, 37), dtype, n, seed)
    mps = [{"weight": w, "density": d} for w, d in zip(weights[:n], densities[:n])]
    if method.startswith("della"):
        for mp in mps:
            mp["epsilon"] = min(0.05, mp["density"] / 2, (1 - mp["density"]) / 2)
    params = {"rescale": rescale}
    calls = []
    real = fused_kernels.masked_delta

    def counting(*args):
        calls.append(1)
        return real(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_kernels, "masked_delta", counting)
        fused = merge_tensors(method, models, base=base, model_params=mps, params=params, seed=seed, chunk_rows=16)
        assert calls, "the fused kernel ran"
        patch.setattr(task_arithmetic, "_masking_kernels", lambda *args: None)
        tensor = merge_tensors(method, models, base=base, model_params=mps, params=params, seed=seed, chunk_rows=16)
    assert torch.equal(fused.view(torch.int32), tensor.view(torch.int32))


def test_masked_delta_is_not_used_for_inputs_it_cannot_read(monkeypatch):
    base, models = family((8, 5), torch.float16, 2, 3)
    calls = []
    monkeypatch.setattr(fused_kernels, "masked_delta", lambda *a: calls.append(1))
    merge_tensors("dare_ties", models, base=base, model_params=[{"density": 0.5}] * 2)
    assert calls == []


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    length=st.integers(2, 3000),
    levels=st.sampled_from([None, 1, 2, 40]),  # few distinct magnitudes: many ties, ranked by position
    zeros=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_radix_row_ranks_are_the_sorted_ranks(rows, length, levels, zeros, seed):
    """DELLA's ranks by the fused radix sort equal the numpy sort of (bits, position) keys."""
    import numpy as np

    from convergent.strategies import della

    rng = np.random.default_rng(seed)
    values = np.abs(rng.standard_normal((rows, length))).astype(np.float32) * np.float32(10.0 ** rng.integers(-30, 30))
    if levels is not None:
        values = np.floor(values * levels) / np.float32(levels)
    if zeros:
        values[:, ::7] = 0.0
    expected = della.sorted_ranks(values)
    got = fused_kernels.row_ranks(values.view(np.uint32), np.empty(values.shape, np.float32))
    assert np.array_equal(got, expected)
    assert np.array_equal(np.sort(got[0]), np.arange(length, dtype=np.float32) / np.float32(length - 1))
    ranked = torch.from_numpy(values.copy())
    assert np.array_equal(della.rank_norm(ranked, 1), expected)
    assert np.array_equal(della.rank_norm(ranked.T.contiguous(), 0), expected.T)


@pytest.mark.parametrize(("chunk_rows", "chunks"), [(None, 1), (1, 2)])  # 1 row rounds up to a block
def test_della_reuses_the_rescale_pass_masks(monkeypatch, chunk_rows, chunks):
    """With rescale, DELLA ranks each block once (in prepare); apply unpacks the kept masks: the same bits."""
    from convergent.strategies import della

    base, models = family((5, 300_000), torch.bfloat16, 3, 7)  # blocks of 3 rows: [0, 3) and [3, 5)
    mps = [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 3
    real = della.DellaMagprune.context
    calls = []

    def counted(self, task, i, mp, state):
        calls.append(task.rows)
        return real(self, task, i, mp, state)

    monkeypatch.setattr(della.DellaMagprune, "context", counted)
    kept = merge_tensors("della", models, base=base, model_params=mps, params={"rescale": True}, chunk_rows=chunk_rows)
    with_cache = len(calls)
    monkeypatch.setattr(della.DellaMagprune, "keeps_masks", False)
    calls.clear()
    drawn = merge_tensors("della", models, base=base, model_params=mps, params={"rescale": True}, chunk_rows=chunk_rows)
    assert torch.equal(kept.view(torch.int32), drawn.view(torch.int32))
    assert with_cache == 2 * 3  # prepare: 2 blocks x 3 models; apply unpacked the masks
    assert len(calls) == with_cache + chunks * 3  # without them, apply ranks every chunk again
