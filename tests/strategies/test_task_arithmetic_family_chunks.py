"""Chunk invariance and seeding of the task-arithmetic family: same bytes whole or chunked, per seed."""

from __future__ import annotations

import pytest
import torch

from convergent import determinism
from convergent.strategies import merge_tensors, order_stats
from convergent.strategies import task_arithmetic as ta

from .test_task_arithmetic_family import ALL, assert_matches, inputs, model_params, ref_gta, ref_sce

STOCHASTIC = {"dare_linear", "dare_ties", "della", "della_linear"}
VARIANTS = {  # global parameters exercising every prepare path
    "task_arithmetic": [{}, {"normalize": True, "lambda": 0.5}],
    "ties": [{}, {"rescale": True, "consensus_method": "count"}],
    "dare_linear": [{}, {"rescale": False, "normalize": True}],
    "dare_ties": [{}, {"normalize": True}],
    "breadcrumbs": [{}, {"rescale": True}],
    "breadcrumbs_ties": [{}, {"rescale": True, "normalize": True}],
    "della": [{}, {"rescale": False}],
    "della_linear": [{}, {"normalize": True}],
    "sce": [{"select_topk": 0.3}, {"select_topk": 1.0}],
}


def merge(method, base, models, params, *, seed=0, chunk_rows=None):
    mps = None if method == "sce" else model_params(method, n=len(models))
    return merge_tensors(
        method, models, base=base, params=params, model_params=mps, name="t", seed=seed, chunk_rows=chunk_rows
    )


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4096 elements and small pieces (straddling blocks), so small tensors span many of both."""
    monkeypatch.setattr(determinism, "BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(order_stats, "STAT_PIECE", 1000)
    monkeypatch.setattr(ta, "PIECE", 1500)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("shape", [(500, 40), (20000,), (300, 7, 9)], ids=str)
def test_chunked_equals_whole_over_many_blocks(small_blocks, method, shape):
    base, models = inputs(shape, seed=len(shape))
    block = determinism.block_rows(shape)
    assert determinism.num_rows(shape) > 3 * block  # really several blocks
    for params in VARIANTS[method]:
        whole = merge(method, base, models, params, seed=3)
        for k in (1, 2 * block + 1, determinism.num_rows(shape) - 1):
            assert torch.equal(merge(method, base, models, params, seed=3, chunk_rows=k), whole), (params, k)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "sce", "ties-rescale", "breadcrumbs-rescale"])
def test_tie_classes_straddling_blocks_chunk_invariantly(small_blocks, monkeypatch, method):
    # a few distinct magnitudes: each threshold's tie class spans many blocks and pieces
    gen = torch.Generator().manual_seed(1)
    shape = (600, 30)
    base = torch.randn(shape, generator=gen).mul_(64).round_().div_(64)
    models = [base + torch.randint(-5, 6, shape, generator=gen).float() / 64 for _ in range(3)]
    name, _, variant = method.partition("-")
    params = {"rescale": True} if variant else ({"select_topk": 0.4} if name == "sce" else {})
    whole = merge(name, base, models, params)
    if name == "sce":
        assert_matches(whole, ref_sce(base, models, 0.4))
    else:  # exactly k survive, the first tied ones in row-major order, across many blocks and pieces
        assert_matches(whole, ref_gta(name, base, models, model_params(name), params))
    for k in (1, 250):
        assert torch.equal(merge(name, base, models, params, chunk_rows=k), whole), k
    # the per-block tie counts recounted in an extra pass (summaries over their cap) give the same bytes
    monkeypatch.setattr(order_stats, "SUMMARY_CAP", 0)
    assert torch.equal(merge(name, base, models, params, chunk_rows=1), whole)


@pytest.mark.parametrize("method", ALL)
def test_piece_sizes_do_not_change_the_bytes(monkeypatch, method):
    base, models = inputs((300, 50), seed=1)
    for params in VARIANTS[method]:
        default = merge(method, base, models, params, seed=2)
        monkeypatch.setattr(order_stats, "STAT_PIECE", 999)
        monkeypatch.setattr(ta, "PIECE", 333)
        assert torch.equal(merge(method, base, models, params, seed=2), default)
        monkeypatch.undo()


@pytest.mark.parametrize("method", ALL)
def test_same_seed_same_bytes_other_seed_differs_when_stochastic(method):
    base, models = inputs((80, 60), seed=5)
    params = VARIANTS[method][0]
    first = merge(method, base, models, params, seed="root-a")
    again = merge(method, base, models, params, seed="root-a")
    other = merge(method, base, models, params, seed="root-b")
    assert first.numpy().tobytes() == again.numpy().tobytes()
    if method in STOCHASTIC:
        assert not torch.equal(first, other)
        # another tensor name draws differently too
        renamed = merge_tensors(
            method, models, base=base, params=params, model_params=model_params(method), name="u", seed="root-a"
        )
        assert not torch.equal(first, renamed)
    else:
        assert torch.equal(first, other)


def test_dare_ties_and_dare_linear_share_the_drop_mask():
    base, models = inputs((50, 50), n=1)
    mps = [{"weight": 1.0, "density": 0.4}]
    a = merge_tensors("dare_linear", models, base=base, model_params=mps, seed=9)
    b = merge_tensors("dare_ties", models, base=base, model_params=mps, seed=9)
    assert torch.equal(a != base, b != base)


@pytest.mark.parametrize("method", ALL)
def test_same_bytes_whatever_the_thread_count(method):
    base, models = inputs((400, 300), seed=6)  # pieces and blocks large enough for multi-threaded kernels
    params = {**VARIANTS[method][0], **({"rescale": True} if method in ("ties", "breadcrumbs") else {})}
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = merge(method, base, models, params, seed=4)
        torch.set_num_threads(max(2, previous))
        many = merge(method, base, models, params, seed=4)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, many)
