"""Strategies that round to the output dtype themselves give the bits of the engine's cast.

``TensorTask.out_dtype`` lets a strategy write a bfloat16 result in the pass
that computes it (linear's weighted sum, the sign-consensus kernels of the
TIES family) instead of a float32 result the engine then casts. Either way the
bytes written must be the same: the float32 result rounded as ``.to(bfloat16)``.
"""

from __future__ import annotations

import pytest
import torch

from convergent import determinism
from convergent.strategies import kernels
from convergent.strategies.run import get_strategy, run_strategy, validate_model_params, validate_params

#: method -> (global parameters, per-model parameters, rounds to bfloat16 itself)
CASES = {
    "linear": ({}, {"weight": 0.3}, True),  # weights below 1: the sums of the huge values stay finite
    "ties": ({}, {"weight": 0.3, "density": 0.4}, True),
    "dare_ties": ({}, {"weight": 0.9, "density": 0.6}, True),
    "breadcrumbs_ties": ({}, {"weight": 1.0, "density": 0.8, "gamma": 0.05}, True),
    "della": ({}, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}, True),
    "task_arithmetic": ({}, {"weight": 0.5}, False),
}


def _inputs(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(300, 257, generator=gen)
    models = [base + 0.05 * torch.randn(300, 257, generator=gen) for _ in range(3)]
    base[3, :2] = 0.0
    for m in models:  # finite in float32, past bfloat16's largest finite value: rounds to +-Inf
        m[3, :4] = torch.tensor([3.4e38, -3.4e38, 1e-40, 0.0])
    return base.to(dtype), [m.to(dtype) for m in models]


def _run(method: str, dtype: torch.dtype, out_dtype: torch.dtype | None, chunk_rows: int | None) -> torch.Tensor:
    glob, per_model, _ = CASES[method]
    strat = get_strategy(method)
    base, models = _inputs(dtype)
    return run_strategy(
        strat,
        "model.layers.0.mlp.up_proj.weight",
        tuple(base.shape),
        base if strat.base != "none" else None,
        models,
        validate_params(strat, glob),
        [validate_model_params(strat, per_model) for _ in models],
        determinism.seed_key(3, "w"),
        chunk_rows=chunk_rows,
        out_dtype=out_dtype,
    )


@pytest.mark.parametrize("chunk_rows", [None, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("method", sorted(CASES))
def test_rounding_in_the_strategy_gives_the_casts_bits(method, dtype, chunk_rows):
    kernels.load()
    wide = _run(method, dtype, None, chunk_rows)
    narrow = _run(method, dtype, torch.bfloat16, chunk_rows)
    assert wide.dtype == torch.float32
    assert narrow.dtype == (torch.bfloat16 if CASES[method][2] else torch.float32)
    assert torch.equal(narrow.to(torch.bfloat16).view(torch.uint16), wide.to(torch.bfloat16).view(torch.uint16))
    if dtype == torch.float32 and method in ("linear", "ties"):  # the others drop those outliers
        assert torch.isfinite(wide[3, :2]).all() and torch.isinf(narrow.to(torch.bfloat16)[3, :2]).all()


def test_other_output_dtypes_stay_float32():
    kernels.load()
    for method in ("linear", "ties"):
        assert _run(method, torch.bfloat16, torch.float16, None).dtype == torch.float32
