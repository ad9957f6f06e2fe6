"""The sample-bracketed one-pass selection against the two-pass radix select: exact, or a reported miss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convergent.strategies.api import TensorBlocks
from convergent.strategies.bracket_select import MIN_NUMEL, kth_largest_bracketed
from convergent.strategies.order_stats import MagnitudeSelect, kth_largest_abs_many
from convergent.strategies.run import get_strategy, make_task, validate_model_params, validate_params
from convergent.strategies.task_arithmetic import DeltaStreams


def _blocks(base: torch.Tensor, models: list[torch.Tensor]) -> TensorBlocks:
    strat = get_strategy("ties")
    params = validate_params(strat, {})
    mps = tuple(validate_model_params(strat, {}) for _ in models)

    def load(start: int, stop: int):
        return make_task(
            strat,
            "w",
            tuple(base.shape),
            (start, stop),
            base[start:stop],
            [m[start:stop] for m in models],
            params,
            mps,
            b"k" * 32,
        )

    return TensorBlocks("w", tuple(base.shape), params, mps, load)


def _family(seed: int, rows: int, cols: int, dtype: torch.dtype, n: int = 2, stored: bool = False):
    """Values of ``dtype``, held as float32 or (``stored``) in ``dtype`` itself, as the ``ties`` family gets them.

    Stored float32/bfloat16 inputs take the fused tally (``fused_kernels.bracket_tally``);
    the radix select reference always goes through float32 tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=gen).to(dtype).float()
    models = [(base + 0.01 * torch.randn(rows, cols, generator=gen)).to(dtype).float() for _ in range(n)]
    if stored:
        return base.to(dtype), [m.to(dtype) for m in models]
    return base, models


def _radix(blocks, wanted):
    return MagnitudeSelect(blocks, DeltaStreams, list(wanted)).kth_largest(wanted)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.sampled_from([256, 300, 1031]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    fracs=st.lists(st.floats(0.001, 0.999), min_size=1, max_size=3),
    stored=st.booleans(),
)
def test_bracketed_equals_radix_select(seed, rows, dtype, fracs, stored):
    base, models = _family(seed, rows, 1024, dtype, stored=stored)
    assert base.numel() >= MIN_NUMEL
    blocks = _blocks(base, models)
    numel = base.numel()
    wanted = {i: [max(1, int(f * numel)) for f in fracs] for i in range(len(models))}
    found = kth_largest_bracketed(blocks, DeltaStreams, wanted)
    exact = _radix(blocks, wanted)
    hits = 0
    for i in wanted:
        for got, ref in zip(found[i], exact[i]):
            if got is not None:
                hits += 1
                assert (got.value, got.greater, got.equal, got.per_block) == (
                    ref.value,
                    ref.greater,
                    ref.equal,
                    ref.per_block,
                )
    assert hits == sum(len(ks) for ks in wanted.values())  # i.i.d. data: the sample never misses


def test_a_missed_bracket_is_reported_and_the_merge_falls_back_exactly():
    # The sampled rows are quiet, the rest are loud: the sample brackets the wrong values.
    rows, cols = 1024, 512
    base = torch.zeros(rows, cols)
    loud = torch.full((rows, cols), 5.0) + torch.arange(rows * cols, dtype=torch.float32).view(rows, cols) * 1e-6
    from convergent.strategies.bracket_select import _sample_runs

    quiet = torch.zeros(rows, dtype=torch.bool)
    for start, stop in _sample_runs((rows, cols)):
        quiet[start:stop] = True
    model = torch.where(quiet[:, None], torch.full((rows, cols), 1e-3), loud)
    blocks = _blocks(base, [model])
    wanted = {0: [rows * cols // 2]}
    assert kth_largest_bracketed(blocks, DeltaStreams, wanted)[0] == [None]
    got = kth_largest_abs_many(blocks, DeltaStreams, wanted)[0][0]
    ref = _radix(blocks, wanted)[0][0]
    assert got == ref
    assert got.value == float(torch.topk(model.flatten().abs(), wanted[0][0]).values[-1])


def test_one_dimensional_tensors_are_sampled_in_runs():
    from convergent.strategies.bracket_select import _sample_runs

    runs = _sample_runs((300_000,))
    assert len(runs) == 64 and sum(b - a for a, b in runs) >= 65536
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(300_000, generator=gen)
    model = base + 0.01 * torch.randn(300_000, generator=gen)
    blocks = _blocks(base, [model])
    wanted = {0: [100_000]}
    assert kth_largest_bracketed(blocks, DeltaStreams, wanted)[0][0] is not None
    assert kth_largest_abs_many(blocks, DeltaStreams, wanted)[0] == _radix(blocks, wanted)[0]


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("special", [float("nan"), float("inf")])
def test_non_finite_magnitudes_count_as_largest(special, stored):
    base, models = _family(3, 512, 1024, torch.bfloat16, n=1, stored=stored)
    models[0][::7, ::5] = special
    blocks = _blocks(base, models)
    numel = base.numel()
    wanted = {0: [numel // 2, numel // 10]}
    got = kth_largest_abs_many(blocks, DeltaStreams, wanted)[0]
    assert got == _radix(blocks, wanted)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stored_float32_and_bfloat16_take_the_fused_tally(dtype, monkeypatch):
    from convergent.strategies import bracket_select

    calls = []
    original = bracket_select._FusedTally.add
    monkeypatch.setattr(bracket_select._FusedTally, "add", lambda self, *a: calls.append(1) or original(self, *a))
    base, models = _family(7, 512, 1024, dtype, stored=True)
    blocks = _blocks(base, models)
    wanted = {0: [base.numel() // 3], 1: [base.numel() // 7, base.numel() // 2]}
    assert kth_largest_abs_many(blocks, DeltaStreams, wanted) == _radix(blocks, wanted)
    assert calls


def _as_float32(values: np.ndarray) -> np.ndarray:
    return values if values.dtype == np.float32 else (values.astype(np.uint32) << 16).view(np.float32)


def _magnitude_bits(models, base) -> list[np.ndarray]:
    return [np.abs(_as_float32(m) - _as_float32(base)).view(np.uint32) for m in models]


def _tally_reference(models, base, key_model, lo, hi):
    """``fused_kernels.bracket_tally`` written with numpy: counts, and the inside values in flat order."""
    magnitudes = _magnitude_bits(models, base)
    counts, inside = [], []
    for q, i in enumerate(key_model):
        bits = magnitudes[i]
        low, high = lo[q], hi[q]
        strictly = (bits > low) & (bits < high)
        counts.append(
            [
                int((bits > high).sum()),
                int((bits == high).sum()),
                int((bits == low).sum()) if low < high else 0,
                int(strictly.sum()) if low < high else 0,
            ]
        )
        inside.append(bits[strictly].view(np.float32) if low < high else np.zeros(0, np.float32))
    return counts, inside


@settings(max_examples=25, deadline=None)
@given(
    size=st.sampled_from([1, 15, 16, 17, 255, 256, 257, 4099, 65537]),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
    brackets=st.lists(st.tuples(st.integers(0, 2), st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=1, max_size=4),
)
def test_fused_tally_counts_and_collects_like_numpy(size, bf16, seed, brackets):
    """Every length (whole 16-element collects and the tail), several keys per model, empty brackets.

    Bracket ends are magnitudes of the data (ranks ``a`` and ``b`` of the
    model's), so the ends' own counts and the strictness of "inside" are tested.
    """
    from convergent.strategies import fused_kernels

    rng = np.random.default_rng(seed)
    values = [rng.normal(0, 0.05, size).astype(np.float32) for _ in range(4)]
    values[1][:: max(1, size // 5)] = np.float32(0.05)  # some magnitudes on a bracket end
    if bf16:
        values = [torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16) for v in values]
    base, models = values[0], tuple(values[1:])
    key_model = np.array([i for i, _, _ in brackets], dtype=np.int64)
    magnitudes = [np.sort(bits) for bits in _magnitude_bits(models, base)]
    ends = [sorted(magnitudes[i][int(r * (size - 1))] for r in (a, b)) for i, a, b in brackets]
    lo = np.array([low for low, _ in ends], dtype=np.uint32)
    hi = np.array([high for _, high in ends], dtype=np.uint32)
    inside = np.full((len(brackets), size + fused_kernels.COLLECT_SLACK), np.nan, dtype=np.float32)
    counts = np.full((len(brackets), 4), -1, dtype=np.int64)
    fused_kernels.bracket_tally(models, base, key_model, lo, hi, inside, counts)
    want_counts, want_inside = _tally_reference(models, base, key_model, lo, hi)
    assert counts.tolist() == want_counts
    for q, expected in enumerate(want_inside):
        assert np.array_equal(inside[q, : expected.size], expected)


def test_fused_and_numpy_selection_agree(monkeypatch):
    """Brackets and in-bracket picks by the fused radix select or by ``np.partition``: the same statistics."""
    from convergent.strategies import kernels

    kernels.load()
    base, models = _family(11, 700, 1024, torch.bfloat16, n=3, stored=True)
    blocks = _blocks(base, models)
    numel = base.numel()
    wanted = {0: [numel // 2], 1: [numel // 9, numel // 3], 2: [7]}
    fused = kth_largest_bracketed(blocks, DeltaStreams, wanted)
    monkeypatch.setattr(kernels, "loaded", lambda: None)
    assert kth_largest_bracketed(blocks, DeltaStreams, wanted) == fused
    assert any(stat is not None for stats in fused.values() for stat in stats)
