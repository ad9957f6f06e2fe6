"""``kernels``: the NaN/Inf bit test agrees with torch, and strategies never wait for numba."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convergent.strategies import kernels


@pytest.fixture(autouse=True, scope="module")
def _loaded():
    kernels.load()


@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([1, 7, 255, 256, 257, 4096, 10_001]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    special=st.sampled_from([None, float("nan"), float("inf"), float("-inf"), 3e38]),
    where=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_all_finite_agrees_with_torch(size, dtype, special, where, seed):
    values = torch.randn(size, generator=torch.Generator().manual_seed(seed)) * 1e3
    if special is not None:
        values[int(where * (size - 1))] = special  # 3e38 overflows bfloat16 to Inf, and is finite in float32
    t = values.to(dtype)
    assert kernels.all_finite(t) is bool(torch.isfinite(t).all())


def test_all_finite_declines_what_it_cannot_read(monkeypatch):
    assert kernels.all_finite(torch.ones(8, dtype=torch.float16)) is None
    assert kernels.all_finite(torch.ones(8, dtype=torch.float64)) is None
    assert kernels.all_finite(torch.ones(8, 4).t()) is None  # not contiguous
    monkeypatch.setattr(kernels, "loaded", lambda: None)
    assert kernels.all_finite(torch.ones(8)) is None


def test_loaded_never_imports_numba(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "convergent.strategies.fused_kernels")
    assert kernels.loaded() is None
    assert "convergent.strategies.fused_kernels" not in sys.modules


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(1, 5000),
    scale=st.sampled_from([1e-3, 1.0, 1e30]),
    levels=st.sampled_from([None, 1, 3, 50]),  # few distinct values: heavy ties
    where=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_kth_smallest_equals_partition(size, scale, levels, where, seed):
    """The radix select of the fused kernels against ``np.partition``: every rank, ties, zeros, wide ranges."""

    fused = kernels.loaded()
    rng = np.random.default_rng(seed)
    values = np.abs(rng.standard_normal(size) * scale).astype(np.float32)
    if levels is not None:
        values = np.abs(rng.integers(0, levels, size)).astype(np.float32) * np.float32(scale)
    k = int(where * (size - 1))
    scratch = np.full(size + fused.COLLECT_SLACK, np.nan, np.float32)
    got = fused.kth_smallest(values, k, scratch)
    assert got == np.partition(values, k)[k]
    assert values.dtype == np.float32 and not np.isnan(values).any()  # the input is left as it was


def test_without_numba_ties_fails_clearly_and_linear_falls_back(monkeypatch):
    """numba unimportable: the kernels' users get one clear error; linear, which has a torch path, still merges."""
    import sys

    import convergent.strategies
    from convergent.errors import ConvergentError
    from convergent.strategies import linear

    monkeypatch.delitem(sys.modules, "convergent.strategies.fused_kernels")
    monkeypatch.delattr(convergent.strategies, "fused_kernels")
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    with pytest.raises(ConvergentError, match="fused merge kernels cannot be loaded") as info:
        kernels.require()
    assert "pip install" in (info.value.hint or "")
    models = [torch.ones(5, dtype=torch.bfloat16), torch.full((5,), 3.0, dtype=torch.bfloat16)]
    assert torch.equal(linear.weighted_sum(models, [1.0, 1.0], True, "w"), torch.full((5,), 2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_magnitudes_are_the_task_vector_magnitudes(dtype):

    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1001, generator=gen).to(dtype)
    models = [(base.float() + torch.randn(1001, generator=gen) * 0.01).to(dtype) for _ in range(3)]
    models[1][5] = float("nan")
    out = np.empty((2, 1001), np.float32)
    kernels.loaded().magnitudes(
        tuple(kernels.raw_array(m) for m in models), kernels.raw_array(base), np.array([2, 1]), out
    )
    for row, i in zip(out, [2, 1]):
        expected = (models[i].float() - base.float()).abs()
        assert torch.equal(torch.from_numpy(row).view(torch.int32), expected.view(torch.int32))


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    first=st.one_of(st.integers(0, 10_000), st.integers(2**40, 2**50)),
    count=st.integers(1, 3000),
)
def test_fused_random_draws_are_the_numpy_reference(seed, first, count):
    """SplitMix64 in numba and in numpy: the same keep masks, for one bound and for one per number."""
    from convergent import determinism

    reference = determinism.splitmix_uniform(seed, first, count)
    per_element = np.random.default_rng(seed % 2**32).random(count, dtype=np.float32)
    for bound in (np.float32(0.3), per_element):
        mask = kernels.keep_mask(seed, first, count, bound)
        assert np.array_equal(mask, (reference < bound).astype(np.float32))


@pytest.mark.parametrize("p", [0.0, 0.1, 1 / 3, 0.5, 0.9, 1.0])
def test_keep_mask_is_the_comparison_in_float32(p):
    """DARE's mask keeps ``uniform < float32(density)``, as torch compares a float32 tensor with a number."""
    from convergent import determinism

    u = torch.from_numpy(determinism.splitmix_uniform(11, 0, 1 << 20))
    mask = kernels.keep_mask(11, 0, 1 << 20, p)
    assert np.array_equal(mask, (u < p).float().numpy())
    assert abs(mask.mean() - p) < 0.002


def test_random_draws_without_numba_give_the_same_bits(monkeypatch):
    from convergent.errors import ConvergentError

    fused_m = kernels.keep_mask(5, 77, 999, 0.25)

    def no_numba():
        raise ConvergentError("the fused merge kernels cannot be loaded: no numba")

    monkeypatch.setattr(kernels, "loaded", lambda: None)
    monkeypatch.setattr(kernels, "load", no_numba)
    assert np.array_equal(kernels.keep_mask(5, 77, 999, 0.25), fused_m)
    values = np.ones(9, np.float32)
    assert kernels.masked_l1(values, values, values) is None  # the caller then sums in the reference order
    with pytest.raises(ValueError, match="3 bounds for 999 numbers"):
        kernels.keep_mask(5, 77, 999, np.ones(3, np.float32))


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(1, 3000),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    keep=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_masked_l1_is_the_reference_order(size, dtype, keep, seed):
    """The fused L1 norms of DARE/DELLA rescaling equal the numpy reference bit for bit.

    Magnitudes spanning 1e-8 to 1e8 make the float64 sums depend on their order,
    so a kernel adding in another order than the reference's lanes fails here.
    """
    gen = torch.Generator().manual_seed(seed)
    scales = 10.0 ** torch.randint(-8, 9, (size,), generator=gen).float()
    base = (torch.randn(size, generator=gen) * scales).to(dtype)
    model = (torch.randn(size, generator=gen) * scales).to(dtype)
    mask = (torch.rand(size, generator=gen) < keep).float().numpy()
    fused = kernels.masked_l1(kernels.raw_array(model), kernels.raw_array(base), mask)
    delta = (model.float() - base.float()).numpy()
    assert fused == kernels.masked_l1_reference(delta, mask)
    exact_before = float(np.abs(delta).astype(np.float64).sum())
    assert fused[0] == pytest.approx(exact_before, rel=1e-12)
    assert fused[1] <= fused[0]
