"""``linear``: the fused kernel and the tensor path give the same bits, and both follow mergekit's formula.

Once the fused kernels are loaded (the engine loads them on a background
thread when a merge starts), float32 and bfloat16 inputs take
``fused_kernels.weighted_sum``; until then, and for other dtypes, torch ops do
the same float32 operations. Which path a tensor took depends on timing, so
the two must agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convergent.strategies import kernels, linear

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def fused_calls(monkeypatch):
    """Load the kernels; count the calls that really went through the fused kernel."""
    kernels.load()
    module = kernels.loaded()
    assert module is not None
    calls = []
    original = module.weighted_sum
    monkeypatch.setattr(module, "weighted_sum", lambda *a: calls.append(1) or original(*a))
    return calls


def _both_paths(models, weights, normalize, monkeypatch, fused_calls):
    fused = linear.weighted_sum(models, weights, normalize, "w")
    assert fused_calls, "the fused kernel did not run"
    with monkeypatch.context() as m:
        m.setattr(kernels, "loaded", lambda: None)
        tensor = linear.weighted_sum(models, weights, normalize, "w")
    return fused, tensor


def _mergekit(models, weights, normalize):
    """mergekit 0.1.5 ``LinearMerge``: stacked products summed over the model axis, divided by the weights' sum."""
    stacked = torch.stack([m.to(torch.float32) for m in models])
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * models[0].dim()))
    out = (stacked * w).sum(dim=0)
    return out / w.sum(dim=0) if normalize else out


# the fixtures are safe to share between examples: the call list is cleared, the patch is scoped
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.sampled_from([1, 17, 255, 256, 257, 10_007]),
    n=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    weights=st.lists(st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 1e-3), min_size=4, max_size=4),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_and_tensor_paths_give_the_same_bits(size, n, dtype, weights, normalize, seed, monkeypatch, fused_calls):
    gen = torch.Generator().manual_seed(seed)
    models = [torch.randn(size, generator=gen).to(dtype) for _ in range(n)]
    weights = weights[:n]
    if normalize and abs(sum(weights)) < 0.25:
        weights[0] += 1.0  # a near-zero total would magnify the order-of-summation differences below
    fused_calls.clear()
    fused, tensor = _both_paths(models, weights, normalize, monkeypatch, fused_calls)
    assert fused.dtype == tensor.dtype == torch.float32
    assert torch.equal(fused.view(torch.int32), tensor.view(torch.int32))
    # mergekit sums the weights in float32 (we in float64, rounded once): equal to float32 rounding
    torch.testing.assert_close(fused, _mergekit(models, weights, normalize), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_dimensional_weights_of_one_match_mergekit_exactly(dtype, monkeypatch, fused_calls):
    gen = torch.Generator().manual_seed(1)
    models = [torch.randn(300, 77, generator=gen).to(dtype) for _ in range(3)]
    fused, tensor = _both_paths(models, [1.0, 1.0, 1.0], True, monkeypatch, fused_calls)
    assert fused.shape == (300, 77)
    assert torch.equal(fused, tensor)
    assert torch.equal(fused, _mergekit(models, [1.0, 1.0, 1.0], True))


@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_propagate_on_both_paths(special, monkeypatch, fused_calls):
    models = [torch.ones(40), torch.full((40,), 2.0)]
    models[1][7] = special
    fused, tensor = _both_paths(models, [0.5, 0.0], True, monkeypatch, fused_calls)
    assert not torch.isfinite(fused[7]) and not torch.isfinite(tensor[7])  # 0 * Inf is NaN too
    assert torch.equal(fused[:7], tensor[:7]) and torch.equal(fused[:7], torch.ones(7))


def test_mixed_and_other_dtypes_take_the_tensor_path(fused_calls):
    models = [torch.randn(64), torch.randn(64).to(torch.bfloat16), torch.randn(64).to(torch.float16)]
    out = linear.weighted_sum(models, [1.0, 2.0, 3.0], True, "w")
    assert not fused_calls
    torch.testing.assert_close(out, _mergekit(models, [1.0, 2.0, 3.0], True))
    doubles = [torch.randn(64, dtype=torch.float64) for _ in range(2)]
    out = linear.weighted_sum(doubles, [1.0, 1.0], False, "w")
    assert not fused_calls and out.dtype == torch.float32
    assert torch.equal(out, doubles[0].float() + doubles[1].float())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([1, 255, 257, 4099]))
def test_bfloat16_output_rounds_every_float32_as_torch_casts(seed, size):
    """A bfloat16 ``out`` gets each float32 sum rounded as ``.to(torch.bfloat16)``: any bit pattern, NaN and Inf too."""
    kernels.load()
    fused = kernels.loaded()
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32)
    bits[: min(size, 6)] = [0x7F800000, 0xFF800000, 0x7FC00001, 0x3F808000, 0x3F818000, 0x7F7FFFFF][: min(size, 6)]
    values = bits.view(np.float32)  # ties to even (0x3F808000 down, 0x3F818000 up), overflow to Inf, NaNs
    out = np.empty(size, np.uint16)
    fused.weighted_sum((values,), np.ones(1, np.float32), False, np.float32(1), out)
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.uint16).numpy()
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bfloat16_out_dtype_is_the_float32_result_cast(dtype, fused_calls):
    gen = torch.Generator().manual_seed(2)
    models = [torch.randn(1000, 33, generator=gen).to(dtype) for _ in range(3)]
    weights = [0.2, 0.5, 1.3]
    narrow = linear.weighted_sum(models, weights, True, "w", torch.bfloat16)
    wide = linear.weighted_sum(models, weights, True, "w")
    assert narrow.dtype == torch.bfloat16 and wide.dtype == torch.float32 and len(fused_calls) == 2
    assert torch.equal(narrow.view(torch.uint16), wide.to(torch.bfloat16).view(torch.uint16))
    # other output dtypes stay float32: the engine casts them
    assert linear.weighted_sum(models, weights, True, "w", torch.float16).dtype == torch.float32


def test_big_pieces_wait_for_the_kernels_small_ones_do_not(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(kernels, "loaded", lambda: None)
    monkeypatch.setattr(kernels, "waited", lambda: sentinel)
    assert kernels.for_size(kernels.WAIT_NUMEL) is sentinel
    assert kernels.for_size(kernels.WAIT_NUMEL - 1) is None
