"""Random draws and whole-tensor statistics do not depend on chunking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convergent import determinism
from convergent.strategies import reduce
from convergent.strategies.reduce import kth_largest, kth_smallest


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 3000), cols=st.integers(1, 900), chunk_blocks=st.integers(1, 3))
def test_uniform_rows_same_whole_or_chunked(rows, cols, chunk_blocks):
    shape = (rows, cols)
    key = determinism.seed_key(7, "w")
    whole = determinism.uniform_rows(key, "p", shape, 0, rows)
    step = determinism.block_rows(shape) * chunk_blocks
    parts = [determinism.uniform_rows(key, "p", shape, s, min(rows, s + step)) for s in range(0, rows, step)]
    assert torch.equal(torch.cat(parts), whole)
    assert whole.min() >= 0 and whole.max() < 1


def test_draws_depend_on_seed_name_and_purpose():
    shape = (50, 4)
    base = determinism.uniform_rows(determinism.seed_key(1, "a"), "p", shape, 0, 50)
    assert not torch.equal(base, determinism.uniform_rows(determinism.seed_key(2, "a"), "p", shape, 0, 50))
    assert not torch.equal(base, determinism.uniform_rows(determinism.seed_key(1, "b"), "p", shape, 0, 50))
    assert not torch.equal(base, determinism.uniform_rows(determinism.seed_key(1, "a"), "q", shape, 0, 50))
    assert torch.equal(base, determinism.uniform_rows(determinism.seed_key(1, "a"), "p", shape, 0, 50))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=False, allow_infinity=True, width=32), min_size=1, max_size=300),
    k_frac=st.floats(0, 1),
    chunk=st.integers(1, 50),
)
@pytest.mark.parametrize("in_memory_limit", [1 << 24, 0], ids=["gathered", "radix"])
def test_kth_largest_is_exact_topk(values, k_frac, chunk, in_memory_limit):
    saved, reduce.IN_MEMORY_SELECT = reduce.IN_MEMORY_SELECT, in_memory_limit
    try:
        check_kth(values, k_frac, chunk)
    finally:
        reduce.IN_MEMORY_SELECT = saved


def check_kth(values, k_frac, chunk):
    x = torch.tensor(values, dtype=torch.float32)
    k = 1 + int(k_frac * (len(values) - 1))
    expected = float(torch.topk(x, k).values[-1])
    got = kth_largest(lambda: x.split(chunk), k)
    assert got == expected or (got == 0.0 and expected == 0.0)
    assert kth_smallest(lambda: x.split(chunk), k) == float(torch.topk(x, k, largest=False).values[-1])
