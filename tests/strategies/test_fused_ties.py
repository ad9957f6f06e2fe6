"""The fused TIES kernel gives the same bits as the tensor path, and both match the reference.

``ties`` merges float32 and bfloat16 inputs through
``fused_kernels.ties_merge`` (one pass: decode, task vector, magnitude cut,
tie rule, scaling, sign election, disjoint mean). The tensor path (torch ops,
then ``fused_kernels.consensus_merge``) still serves mixed dtypes and the
other sparsifiers, so both must agree bit for bit: replicas merging the same
inputs must write the same bytes whichever path a piece took.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from convergent.strategies import task_arithmetic
from tests.strategies.test_task_arithmetic_family import NAME, assert_matches, ref_gta

SHAPE = (600, 1000)  # 600k elements: several pieces of either path (below), so piece and tie boundaries are crossed


@pytest.fixture(autouse=True)
def _small_fused_pieces(monkeypatch):
    """Fused pieces of 2**17 elements (2**20 in use): the kernel's piece and tie-cursor boundaries get crossed."""
    monkeypatch.setattr(task_arithmetic, "FUSED_PIECE", 1 << 17)


@contextlib.contextmanager
def tensor_path():
    """Force every piece through the tensor path."""
    original = task_arithmetic._FusedTies.of
    task_arithmetic._FusedTies.of = classmethod(lambda cls, *a, **k: None)  # type: ignore[method-assign]
    try:
        yield
    finally:
        task_arithmetic._FusedTies.of = original  # type: ignore[method-assign]


@contextlib.contextmanager
def counting_fused_pieces():
    """Count the pieces the fused kernel merged (a test of both paths must see it work)."""
    original = task_arithmetic._FusedTies.merge
    fused = []

    def merge(self, *args):
        done = original(self, *args)
        fused.append(done)
        return done

    task_arithmetic._FusedTies.merge = merge  # type: ignore[method-assign]
    try:
        yield fused
    finally:
        task_arithmetic._FusedTies.merge = original  # type: ignore[method-assign]


def tied_inputs(dtype, n=3, seed=0):
    """bf16-like task vectors: few distinct magnitudes, so tie classes straddle every threshold."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=gen)
    models = [base + torch.randint(-5, 6, SHAPE, generator=gen).float() * 2**-9 * (i + 1) for i in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


def smooth_inputs(dtype, n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=gen)
    models = [base + torch.randn(SHAPE, generator=gen) * 0.01 * (i + 1) for i in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


def zero_base_inputs(dtype, n=3, seed=2):
    """A zero base: the output is the merged task vector itself, so every rounding step shows."""
    gen = torch.Generator().manual_seed(seed)
    models = [torch.randn(SHAPE, generator=gen) * 0.01 * (i + 1) for i in range(n)]
    return torch.zeros(SHAPE, dtype=dtype), [m.to(dtype) for m in models]


def merge(base, models, mps, params, chunk_rows=None):
    from convergent.strategies import merge_tensors

    return merge_tensors("ties", models, base=base, params=params, model_params=mps, name=NAME, chunk_rows=chunk_rows)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a.isnan(), b.isnan())
    keep = ~a.isnan()
    assert torch.equal(a[keep].view(torch.int32), b[keep].view(torch.int32))


CASES = [
    ({}, [0.5, 0.3, 0.8]),
    ({"consensus_method": "count"}, [0.5, 0.3, 0.8]),
    ({"normalize": False, "lambda": 0.7}, [0.4, 0.2, 0.9]),
    ({"rescale": True}, [0.5, 0.3, 1.0]),
    ({}, [0.0, 0.6, 1.0]),  # density 0 keeps nothing, 1 keeps everything
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("data", [tied_inputs, smooth_inputs, zero_base_inputs], ids=["tied", "smooth", "zero-base"])
@pytest.mark.parametrize(("params", "densities"), CASES, ids=str)
def test_fused_and_tensor_paths_give_the_same_bits_and_match_the_reference(dtype, data, params, densities):
    base, models = data(dtype)
    weights = [0.7, -0.3, 1.0]  # a negative weight flips that model's vote
    mps = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    with counting_fused_pieces() as pieces:
        fused = merge(base, models, mps, params)
    assert any(pieces)  # the fused kernel really ran
    with tensor_path():
        reference_path = merge(base, models, mps, params)
    assert_same_bits(fused, reference_path)
    assert_same_bits(merge(base, models, mps, params, chunk_rows=7), fused)
    assert_matches(fused, ref_gta("ties", base.float(), [m.float() for m in models], mps, params))


def test_zero_weights_and_mixed_dtypes_take_a_path_with_the_same_bits():
    base, models = tied_inputs(torch.bfloat16)
    mps = [{"weight": w, "density": 0.4} for w in (0.0, 1.0, 0.0)]  # no model agrees where only zeros vote
    fused = merge(base, models, mps, {})
    with tensor_path():
        assert_same_bits(merge(base, models, mps, {}), fused)
    # a float32 base with bfloat16 models is not fused; it converts to the same float32 values
    assert_same_bits(merge(base.float(), models, mps, {}), fused)
    assert_same_bits(merge(base.float(), [m.float() for m in models], mps, {}), fused)


def test_non_finite_inputs_give_the_same_result_on_both_paths():
    base, models = smooth_inputs(torch.float32)
    models[0][3, 5] = float("nan")
    models[1][10, 0] = float("inf")
    models[2][200, 999] = float("-inf")
    mps = [{"weight": 1.0, "density": 0.5}] * 3
    fused = merge(base, models, mps, {})
    with tensor_path():
        assert_same_bits(merge(base, models, mps, {}), fused)
    assert not fused[3, 5].isfinite() or fused[3, 5] == base[3, 5]  # NaN never agrees with the elected sign
    finite = torch.ones(SHAPE, dtype=torch.bool)
    finite[3, 5] = finite[10, 0] = finite[200, 999] = False
    assert fused[finite].isfinite().all()


def test_the_tie_rule_keeps_exactly_k_on_the_fused_path():
    base = torch.zeros(SHAPE, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    model = (torch.randint(-3, 4, SHAPE, generator=gen).float() * 2**-8).to(torch.bfloat16)
    n = model.numel()
    out = merge(base, [model], [{"weight": 1.0, "density": 0.37}], {"normalize": False})
    assert int((out != 0).sum()) == int(0.37 * n)
    kept_magnitudes = out.abs().flatten()
    threshold = kept_magnitudes[kept_magnitudes > 0].min()
    tied = (model.float().abs().flatten() == threshold).nonzero().flatten()
    survivors = (kept_magnitudes[tied] != 0).nonzero().flatten()
    # the surviving tied elements are the first ones in flat order
    assert torch.equal(survivors, torch.arange(survivors.numel()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(
    "method", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs_ties", "della", "della_linear"]
)
def test_the_family_reads_any_stored_dtype_as_its_float32_values(dtype, method):
    # raw inputs: each method converts what it reads; the result must be that of float32 copies
    from convergent.strategies import merge_tensors

    gen = torch.Generator().manual_seed(4)
    base = torch.randn(256, 1100, generator=gen).to(dtype)
    models = [(base.double() + torch.randn(256, 1100, generator=gen) * 0.01).to(dtype) for _ in range(3)]
    mps = [{"weight": w, "density": 0.5} for w in (0.6, 1.0, 0.8)]
    if method.startswith("della"):
        mps = [{**mp, "epsilon": 0.1} for mp in mps]
    stored = merge_tensors(method, models, base=base, model_params=mps, name=NAME, seed=3)
    as_f32 = merge_tensors(method, [m.float() for m in models], base=base.float(), model_params=mps, name=NAME, seed=3)
    assert_same_bits(stored, as_f32)
