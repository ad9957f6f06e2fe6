"""Federated aggregators: references written from the papers, robustness properties, chunking."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convergent import determinism
from convergent.errors import MergeInputError
from convergent.strategies import merge_tensors


def _models(n: int, shape: tuple[int, ...], seed: int, spread: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    center = torch.randn(shape, generator=gen)
    return [center + spread * torch.randn(shape, generator=gen) for _ in range(n)]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _flat(models: list[torch.Tensor]) -> list[list[float]]:
    return [m.reshape(-1).tolist() for m in models]


# --------------------------------------------------------------------------- fedavg


def test_fedavg_matches_sample_weighted_average() -> None:
    models = _models(3, (5, 4), seed=1)
    counts = [10, 30, 60]
    out = merge_tensors("fedavg", models, model_params=[{"num_examples": c} for c in counts])
    # McMahan et al.: w = sum_k (n_k / n) w_k, written out per coordinate.
    flat = _flat(models)
    total = sum(counts)
    expected = [math.fsum(counts[k] * flat[k][j] for k in range(3)) / total for j in range(20)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32).reshape(5, 4))


def test_fedavg_with_equal_counts_is_the_mean() -> None:
    models = _models(4, (6, 3), seed=2)
    mean = torch.stack(models).to(torch.float64).mean(0).to(torch.float32)
    equal = merge_tensors("fedavg", models, model_params=[{"num_examples": 7}] * 4)
    unweighted = merge_tensors("fedavg", models)
    torch.testing.assert_close(equal, mean)
    assert _same_bytes(equal, unweighted)


def test_fedavg_uses_weights_without_counts_and_rejects_a_mix() -> None:
    models = _models(2, (3,), seed=3)
    out = merge_tensors("fedavg", models, model_params=[{"weight": 1.0}, {"weight": 3.0}])
    torch.testing.assert_close(out, 0.25 * models[0] + 0.75 * models[1])
    with pytest.raises(MergeInputError, match="num_examples"):
        merge_tensors("fedavg", models, model_params=[{"num_examples": 5}, {}])


# --------------------------------------------------------------------------- median / trimmed mean


@pytest.mark.parametrize("n", [5, 6])
def test_median_matches_per_coordinate_median(n: int) -> None:
    models = _models(n, (4, 5), seed=n)
    out = merge_tensors("median", models)
    flat = _flat(models)
    expected = [statistics.median(flat[k][j] for k in range(n)) for j in range(20)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32).reshape(4, 5), rtol=0, atol=1e-7)


def test_trimmed_mean_matches_definition() -> None:
    n, beta = 10, 0.2
    models = _models(n, (3, 7), seed=11)
    out = merge_tensors("trimmed_mean", models, params={"beta": beta})
    flat = _flat(models)
    k = 2  # floor(0.2 * 10) from each end
    expected = []
    for j in range(21):
        values = sorted(flat[i][j] for i in range(n))[k : n - k]
        expected.append(math.fsum(values) / len(values))
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32).reshape(3, 7))


_finite32 = st.floats(min_value=-1e3, max_value=1e3, width=32, allow_nan=False)
_arbitrary32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    honest_count=st.integers(min_value=1, max_value=6),
    byzantine_count=st.integers(min_value=0, max_value=5),
    data=st.data(),
)
def test_median_and_trimmed_mean_ignore_a_minority_of_arbitrary_models(
    honest_count: int, byzantine_count: int, data: st.DataObject
) -> None:
    byzantine_count = min(byzantine_count, honest_count - 1)  # strictly fewer than half of n
    n = honest_count + byzantine_count
    width = 3
    x = data.draw(st.lists(_finite32, min_size=width, max_size=width))
    junk = [data.draw(st.lists(_arbitrary32, min_size=width, max_size=width)) for _ in range(byzantine_count)]
    huge = [[3e38 if i % 2 else -3e38] * width for i in range(byzantine_count)]
    slots = data.draw(st.permutations(list(range(n))))
    beta = byzantine_count / n  # trims floor(beta n) = byzantine_count from each end
    for bad in (junk, huge):
        rows = [torch.tensor(x)] * honest_count + [torch.tensor(b) for b in bad]
        models = [rows[s] for s in slots]
        # Identical honest models: the aggregate is exactly their value (-0.0 == 0.0).
        assert torch.equal(merge_tensors("median", models), torch.tensor(x))
        assert torch.equal(merge_tensors("trimmed_mean", models, params={"beta": beta}), torch.tensor(x))

    # Distinct honest models: the aggregate stays inside their per-coordinate range.
    honest = [data.draw(st.lists(_finite32, min_size=width, max_size=width)) for _ in range(honest_count)]
    rows = [torch.tensor(h) for h in honest] + [torch.tensor(b) for b in junk]
    models = [rows[s] for s in slots]
    low = torch.tensor(honest).amin(0)
    high = torch.tensor(honest).amax(0)
    for out in (merge_tensors("median", models), merge_tensors("trimmed_mean", models, params={"beta": beta})):
        assert bool(((out >= low) & (out <= high)).all()), (out, low, high)


# --------------------------------------------------------------------------- krum / multi-krum


def _krum_reference(models: list[torch.Tensor], f: int) -> list[float]:
    flat = _flat(models)
    n = len(flat)
    scores = []
    for i in range(n):
        dists = sorted(math.fsum((a - b) ** 2 for a, b in zip(flat[i], flat[j])) for j in range(n) if j != i)
        scores.append(math.fsum(dists[: n - f - 2]))
    return scores


def test_krum_and_multi_krum_match_reference() -> None:
    models = _models(7, (4, 3), seed=21)
    scores = _krum_reference(models, f=2)
    best = min(range(7), key=lambda i: (scores[i], i))
    assert torch.equal(merge_tensors("krum", models, params={"num_byzantine": 2}), models[best])
    chosen = sorted(sorted(range(7), key=lambda i: (scores[i], i))[:3])
    out = merge_tensors("multi_krum", models, params={"num_byzantine": 2, "num_selected": 3})
    torch.testing.assert_close(out, torch.stack([models[i] for i in chosen]).mean(0))


def test_krum_selects_an_honest_model_when_byzantines_are_far() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 6, generator=gen)
    honest = [x + 0.01 * torch.randn(8, 6, generator=gen) for _ in range(5)]
    byzantine = [x + 1e4 * torch.randn(8, 6, generator=gen) for _ in range(2)]
    models = [byzantine[0], honest[0], honest[1], byzantine[1], honest[2], honest[3], honest[4]]  # n=7 > 2f+2
    out = merge_tensors("krum", models, params={"num_byzantine": 2})
    assert any(torch.equal(out, h) for h in honest)
    multi = merge_tensors("multi_krum", models, params={"num_byzantine": 2})  # m = n - f = 5: all honest
    torch.testing.assert_close(multi, torch.stack(honest).mean(0))


def test_krum_needs_more_than_2f_plus_2_models() -> None:
    with pytest.raises(MergeInputError, match=r"n > 2f \+ 2"):
        merge_tensors("krum", _models(6, (3,), seed=1), params={"num_byzantine": 2})


# --------------------------------------------------------------------------- geometric median


def _weiszfeld_reference(
    models: list[torch.Tensor], weights: list[float], eps: float, max_iter: int, tol: float
) -> torch.Tensor:
    xs = [m.reshape(-1).to(torch.float64) for m in models]
    a = [w / sum(weights) for w in weights]
    z = sum(ai * x for ai, x in zip(a, xs))

    def objective(z: torch.Tensor) -> float:
        return sum(ai * float(torch.linalg.vector_norm(x - z)) for ai, x in zip(a, xs))

    value = objective(z)
    for _ in range(max_iter):
        betas = [ai / max(eps, float(torch.linalg.vector_norm(x - z))) for ai, x in zip(a, xs)]
        z = sum(b * x for b, x in zip(betas, xs)) / sum(betas)
        new_value = objective(z)
        done = abs(value - new_value) <= tol * new_value
        value = new_value
        if done:
            break
    return z.to(torch.float32).reshape(models[0].shape)


def test_geometric_median_matches_weiszfeld_reference() -> None:
    models = _models(5, (6, 4), seed=31)
    weights = [1.0, 2.0, 1.0, 0.5, 1.5]
    params = {"eps": 1e-8, "max_iter": 50, "tol": 1e-10}
    out = merge_tensors("geometric_median", models, params=params, model_params=[{"weight": w} for w in weights])
    expected = _weiszfeld_reference(models, weights, 1e-8, 50, 1e-10)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_geometric_median_of_identical_models_is_that_model() -> None:
    x = _models(1, (5, 3), seed=4)[0]
    assert _same_bytes(merge_tensors("geometric_median", [x.clone() for _ in range(4)]), x)


def test_geometric_median_is_robust_to_one_outlier() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(10, 4, generator=gen)
    honest = [x + 0.01 * torch.randn(10, 4, generator=gen) for _ in range(4)]
    radius = max(float(torch.linalg.vector_norm(h - x)) for h in honest)
    near = merge_tensors("geometric_median", [honest[0], x + 1e3, *honest[1:]])
    far = merge_tensors("geometric_median", [honest[0], x + 1e6, *honest[1:]])
    # Stays inside the honest cluster, and moving the outlier 1000x further barely moves it.
    assert float(torch.linalg.vector_norm(far - x)) < radius
    assert float((far - near).abs().max()) < 1e-3
    assert float((merge_tensors("fedavg", [*honest, x + 1e6]) - x).abs().max()) > 1e5  # the mean does not


# --------------------------------------------------------------------------- streaming and determinism

_CASES = [
    ("fedavg", {}, [{"num_examples": c} for c in (3, 1, 9, 2, 4)]),
    ("median", {}, None),
    ("trimmed_mean", {"beta": 0.2}, None),
    ("krum", {"num_byzantine": 1}, None),
    ("multi_krum", {"num_byzantine": 1, "num_selected": 2}, None),
    ("geometric_median", {"max_iter": 20}, [{"weight": w} for w in (1.0, 2.0, 1.0, 1.0, 3.0)]),
]


@pytest.mark.parametrize(("method", "params", "model_params"), _CASES)
@pytest.mark.parametrize("shape", [(29, 7), (150,)])
def test_chunked_equals_whole_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, method: str, params: dict, model_params: list | None, shape: tuple[int, ...]
) -> None:
    monkeypatch.setattr(determinism, "BLOCK_ELEMENTS", 64)  # several blocks on a small tensor
    models = _models(5, shape, seed=len(shape))
    whole = merge_tensors(method, models, params=params, model_params=model_params)
    for chunk_rows in (1, 9, 20):
        chunked = merge_tensors(method, models, params=params, model_params=model_params, chunk_rows=chunk_rows)
        assert _same_bytes(whole, chunked), (method, chunk_rows)


@pytest.mark.parametrize(("method", "params", "model_params"), _CASES)
def test_same_seed_gives_identical_bytes(method: str, params: dict, model_params: list | None) -> None:
    for shape in [(7, 5), (11,), ()]:
        models = _models(5, shape, seed=3)
        first = merge_tensors(method, models, params=params, model_params=model_params, seed=42, name="w")
        second = merge_tensors(method, models, params=params, model_params=model_params, seed=42, name="w")
        assert first.shape == shape
        assert _same_bytes(first, second)
