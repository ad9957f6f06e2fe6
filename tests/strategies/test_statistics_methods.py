"""fisher and regmean: differential tests against the papers' formulas, properties, bad statistics."""

from __future__ import annotations

import pytest
import torch

from convergent import determinism
from convergent.errors import MergeInputError
from convergent.strategies import merge_tensors

NAME = "model.layers.3.mlp.down_proj.weight"


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny blocks so that small test tensors stream in several chunks."""
    monkeypatch.setattr(determinism, "BLOCK_ELEMENTS", 64)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a thread pool only adds wake-up latency (results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def fisher_reference(models, fishers, weights, eps):
    num = sum(w * (f.double() + eps) * m.double() for m, f, w in zip(models, fishers, weights))
    den = sum(w * (f.double() + eps) for f, w in zip(fishers, weights))
    return (num / den).float()


# ----------------------------------------------------------------------------- fisher


def test_fisher_matches_reference_formula():
    models = [rand(12, 8, seed=i) for i in range(3)]
    fishers = [rand(12, 8, seed=10 + i).abs() for i in range(3)]
    weights = [1.0, 0.5, 2.0]
    out = merge_tensors(
        "fisher",
        models,
        params={"epsilon": 1e-3},
        model_params=[{"weight": w} for w in weights],
        extras={"fisher": fishers},
        name=NAME,
    )
    torch.testing.assert_close(out, fisher_reference(models, fishers, weights, 1e-3), rtol=1e-5, atol=1e-6)


def test_fisher_with_equal_fisher_is_weighted_average():
    models = [rand(9, 5, seed=i) for i in range(3)]
    f = rand(9, 5, seed=42).abs() + 0.1
    weights = [3.0, 1.0, 0.5]
    out = merge_tensors(
        "fisher", models, model_params=[{"weight": w} for w in weights], extras={"fisher": [f, f, f]}, name=NAME
    )
    expected = sum(w * m for w, m in zip(weights, models)) / sum(weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_fisher_ignores_a_model_with_zero_fisher():
    models = [rand(10, 6, seed=i) for i in range(3)]
    fishers = [rand(10, 6, seed=20).abs() + 0.5, torch.zeros(10, 6), rand(10, 6, seed=21).abs() + 0.5]
    with_zero = merge_tensors("fisher", models, params={"epsilon": 0.0}, extras={"fisher": fishers}, name=NAME)
    without = merge_tensors(
        "fisher", [models[0], models[2]], params={"epsilon": 0.0}, extras={"fisher": [fishers[0], fishers[2]]}
    )
    assert torch.equal(with_zero, without)
    # with the default epsilon floor the zero-Fisher model is ignored up to epsilon
    floored = merge_tensors("fisher", models, extras={"fisher": fishers}, name=NAME)
    torch.testing.assert_close(floored, without, rtol=0, atol=1e-6)


def test_fisher_all_zero_at_an_element_falls_back_to_average():
    models = [rand(4, 4, seed=i) for i in range(2)]
    fishers = [torch.ones(4, 4), torch.ones(4, 4)]
    fishers[0][1, 2] = 0.0
    fishers[1][1, 2] = 0.0
    out = merge_tensors("fisher", models, params={"epsilon": 0.0}, extras={"fisher": fishers}, name=NAME)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, (models[0] + models[1]) / 2)


def test_fisher_without_statistics_is_weighted_average():
    models = [rand(7, 3, seed=i) for i in range(2)]
    weights = [1.0, 3.0]
    expected = (models[0] + 3 * models[1]) / 4
    mps = [{"weight": w} for w in weights]
    torch.testing.assert_close(merge_tensors("fisher", models, model_params=mps), expected)
    torch.testing.assert_close(
        merge_tensors("fisher", models, model_params=mps, extras={"fisher": [None, None]}), expected
    )


def test_fisher_chunked_equals_whole_bit_for_bit():
    models = [rand(37, 8, seed=i) for i in range(3)]
    fishers = [rand(37, 8, seed=30 + i).abs() for i in range(3)]
    kwargs = dict(model_params=[{"weight": w} for w in (0.2, 1.0, 0.7)], extras={"fisher": fishers}, name=NAME)
    whole = merge_tensors("fisher", models, **kwargs)
    for chunk in (8, 16, 24):
        assert torch.equal(whole, merge_tensors("fisher", models, chunk_rows=chunk, **kwargs))


def test_fisher_vectors_and_scalars():
    models = [rand(130, seed=i) for i in range(2)]
    fishers = [rand(130, seed=5).abs(), rand(130, seed=6).abs()]
    whole = merge_tensors("fisher", models, extras={"fisher": fishers})
    assert torch.equal(whole, merge_tensors("fisher", models, extras={"fisher": fishers}, chunk_rows=64))
    torch.testing.assert_close(whole, fisher_reference(models, fishers, [1.0, 1.0], 1e-8), rtol=1e-5, atol=1e-6)
    scalars = [torch.tensor(1.0), torch.tensor(3.0)]
    out = merge_tensors("fisher", scalars, extras={"fisher": [torch.tensor(3.0), torch.tensor(1.0)]})
    torch.testing.assert_close(out, torch.tensor(1.5))


@pytest.mark.parametrize("chunk_rows", [None, 8])
def test_fisher_missing_statistics_names_contribution_and_tensor(chunk_rows):
    models = [rand(16, 8, seed=i) for i in range(3)]
    f = rand(16, 8, seed=9).abs()
    with pytest.raises(MergeInputError) as err:
        merge_tensors("fisher", models, extras={"fisher": [f, None, f]}, name=NAME, chunk_rows=chunk_rows)
    assert "contribution 1" in str(err.value) and NAME in str(err.value)


@pytest.mark.parametrize("chunk_rows", [None, 8])
def test_fisher_wrong_shape_names_contribution_and_tensor(chunk_rows):
    models = [rand(16, 8, seed=i) for i in range(2)]
    good = rand(16, 8, seed=9).abs()
    with pytest.raises(MergeInputError) as err:
        merge_tensors("fisher", models, extras={"fisher": [good, torch.ones(16, 7)]}, name=NAME, chunk_rows=chunk_rows)
    message = str(err.value)
    assert "contribution 1" in message and NAME in message and "shape" in message


def test_fisher_rejects_negative_or_nan_statistics():
    models = [rand(4, 4, seed=i) for i in range(2)]
    bad = torch.ones(4, 4)
    bad[0, 0] = -1.0
    with pytest.raises(MergeInputError, match="contribution 0"):
        merge_tensors("fisher", models, extras={"fisher": [bad, torch.ones(4, 4)]}, name=NAME)
    nan = torch.ones(4, 4)
    nan[1, 1] = float("nan")
    with pytest.raises(MergeInputError, match="contribution 1"):
        merge_tensors("fisher", models, extras={"fisher": [torch.ones(4, 4), nan]}, name=NAME)


# ----------------------------------------------------------------------------- regmean


def regmean_reference(weights, grams, alpha, scales):
    def reduce(g):
        g = g.double()
        off = torch.ones_like(g) * alpha
        off.fill_diagonal_(1.0)
        return g * off

    gs = [reduce(g) * s for g, s in zip(grams, scales)]
    num = sum(w.double() @ g for w, g in zip(weights, gs))
    return (num @ torch.inverse(sum(gs))).float()


def gram_of(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x


def test_regmean_matches_reference_formula():
    ws = [rand(6, 5, seed=i) for i in range(3)]
    grams = [gram_of(rand(20, 5, seed=10 + i)) for i in range(3)]
    scales = [1.0, 2.0, 0.5]
    out = merge_tensors(
        "regmean",
        ws,
        params={"alpha": 0.7},
        model_params=[{"weight": s} for s in scales],
        extras={"gram": grams},
        name=NAME,
    )
    torch.testing.assert_close(out, regmean_reference(ws, grams, 0.7, scales), rtol=1e-5, atol=1e-5)


def test_regmean_identity_grams_is_average():
    ws = [rand(7, 4, seed=i) for i in range(3)]
    eye = torch.eye(4)
    out = merge_tensors("regmean", ws, params={"alpha": 1.0}, extras={"gram": [eye, eye, eye]}, name=NAME)
    torch.testing.assert_close(out, sum(ws) / 3, rtol=1e-5, atol=1e-6)


def test_regmean_solves_the_least_squares_problem():
    d_out, d_in, n = 5, 6, 40
    ws = [rand(d_out, d_in, seed=i) for i in range(3)]
    xs = [rand(n, d_in, seed=100 + i) for i in range(3)]
    out = merge_tensors("regmean", ws, extras={"gram": [gram_of(x) for x in xs]}, name=NAME)
    # min_W sum_i ||X_i W^T - X_i W_i^T||^2 as one stacked least-squares problem
    x = torch.cat(xs).double()
    y = torch.cat([xi.double() @ wi.double().T for xi, wi in zip(xs, ws)])
    solution = torch.linalg.lstsq(x, y).solution.T.float()
    torch.testing.assert_close(out, solution, rtol=1e-4, atol=1e-4)

    # and it is a minimiser: nudging it increases the loss
    def loss(w):
        return sum(((xi @ w.T - xi @ wi.T) ** 2).sum() for xi, wi in zip(xs, ws))

    assert loss(out) <= loss(out + 1e-2 * rand(d_out, d_in, seed=7))


def test_regmean_alpha_zero_is_per_column_weighted_by_input_energy():
    ws = [rand(3, 4, seed=i) for i in range(2)]
    grams = [gram_of(rand(10, 4, seed=20 + i)) for i in range(2)]
    out = merge_tensors("regmean", ws, params={"alpha": 0.0}, extras={"gram": grams}, name=NAME)
    d = [torch.diagonal(g) for g in grams]
    expected = (ws[0] * d[0] + ws[1] * d[1]) / (d[0] + d[1])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_regmean_falls_back_to_average_for_non_linear_tensors():
    biases = [rand(6, seed=i) for i in range(2)]
    out = merge_tensors("regmean", biases, model_params=[{"weight": 1.0}, {"weight": 3.0}], name="x.bias")
    torch.testing.assert_close(out, (biases[0] + 3 * biases[1]) / 4)
    embeddings = [rand(9, 4, seed=i) for i in range(2)]
    out = merge_tensors("regmean", embeddings, extras={"gram": [None, None]}, name="embed_tokens.weight")
    torch.testing.assert_close(out, (embeddings[0] + embeddings[1]) / 2)


def test_regmean_missing_gram_names_contribution_and_tensor():
    ws = [rand(3, 4, seed=i) for i in range(3)]
    g = gram_of(rand(10, 4, seed=3))
    with pytest.raises(MergeInputError) as err:
        merge_tensors("regmean", ws, extras={"gram": [g, g, None]}, name=NAME)
    assert "contribution 2" in str(err.value) and NAME in str(err.value)


def test_regmean_wrong_shape_gram_names_contribution_and_tensor():
    ws = [rand(3, 4, seed=i) for i in range(2)]
    good = gram_of(rand(10, 4, seed=3))
    for bad in (gram_of(rand(10, 3, seed=4)), torch.ones(3, 4), torch.ones(4)):
        with pytest.raises(MergeInputError) as err:
            merge_tensors("regmean", ws, extras={"gram": [bad, good]}, name=NAME)
        message = str(err.value)
        assert "contribution 0" in message and NAME in message and "shape" in message


def test_regmean_singular_gram_sum_is_a_clear_error():
    ws = [rand(3, 4, seed=i) for i in range(2)]
    g = torch.zeros(4, 4)
    g[0, 0] = 1.0
    with pytest.raises(MergeInputError, match="singular"):
        merge_tensors("regmean", ws, extras={"gram": [g, g]}, name=NAME)


def test_statistics_strategies_are_described():
    from convergent.strategies import get_strategy

    fisher = get_strategy("fisher").describe()
    regmean = get_strategy("regmean").describe()
    assert fisher["statistics"] == ["fisher"] and fisher["streams_in_chunks"]
    assert regmean["statistics"] == ["gram"] and not regmean["streams_in_chunks"] and "d_in" in regmean["memory"]
    assert {p["name"] for p in fisher["parameters"]} == {"epsilon"}
    assert {p["name"] for p in regmean["parameters"]} == {"alpha"}
