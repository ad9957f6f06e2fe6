"""mergekit's generalized task arithmetic family, checked against references written from the definitions.

The references below are deliberately plain: whole tensors, a full sort for
every top-k / band selection, double argsort for DELLA's ranks, a Python loop
over models. Stochastic methods are compared on the very same uniform draws
(``determinism.uniform_rows`` with the strategy's purpose names), so they are
checked exactly too, besides statistically.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from convergent import determinism
from convergent.errors import RecipeError
from convergent.strategies import REGISTRY, merge_tensors

GTA = [
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]
ALL = [*GTA, "sce"]
SPARSIFIER = {
    "task_arithmetic": None,
    "ties": "magnitude",
    "dare_linear": "random",
    "dare_ties": "random",
    "breadcrumbs": "magnitude_outliers",
    "breadcrumbs_ties": "magnitude_outliers",
    "della": "della_magprune",
    "della_linear": "della_magprune",
}
CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
# mergekit 0.1.5's registry: (normalize, rescale) defaults
DEFAULTS = {
    "task_arithmetic": (False, False),
    "ties": (True, False),
    "dare_ties": (False, True),
    "dare_linear": (False, True),
    "breadcrumbs": (False, False),
    "breadcrumbs_ties": (False, False),
    "della": (True, True),
    "della_linear": (False, True),
}
NAME = "layers.0.mlp.weight"


def inputs(shape, n=3, seed=0, zeros=0.05):
    """A base and ``n`` fine-tunes: small task vectors, some exactly zero, of different scales."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    models = []
    for i in range(n):
        delta = torch.randn(shape, generator=gen) * 0.01 * (i + 1)
        delta[torch.rand(shape, generator=gen) < zeros] = 0
        models.append(base + delta)
    return base, models


def model_params(method, n=3, **overrides):
    weights = [0.3, 0.5, 0.7, 0.9][:n]
    out = []
    for i in range(n):
        mp = {"weight": weights[i]}
        if method != "task_arithmetic":
            mp["density"] = [0.5, 0.3, 0.8, 0.6][i]
        if method.startswith("breadcrumbs"):
            mp["gamma"] = [0.05, 0.01, 0.1, 0.0][i]
        if method.startswith("della"):
            mp["epsilon"] = [0.2, 0.1, 0.15, 0.05][i]
        out.append({**mp, **overrides})
    return out


# --------------------------------------------------------------------------- references


def uniform(seed, purpose, shape):
    key = determinism.seed_key(seed, NAME)
    return determinism.uniform_rows(key, purpose, tuple(shape), 0, determinism.num_rows(tuple(shape)))


def first_in_flat_order(mask, count):
    """Keep only the first ``count`` True elements of ``mask`` in row-major order."""
    flat = mask.flatten()
    order = torch.cumsum(flat.to(torch.int64), 0)
    return (flat & (order <= count)).reshape(mask.shape)


def ascending(values):
    """All values of a tensor, sorted ascending (numpy's sort: fast, and ties do not matter for values)."""
    return torch.from_numpy(np.sort(values.flatten().numpy()))


def ref_magnitude(delta, density):
    """TIES trim: keep exactly the k = max(1, int(density * n)) largest |delta|; ties: first in row-major order."""
    if density >= 1:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    mags = delta.abs()
    k = max(1, int(density * mags.numel()))
    kth = ascending(mags)[mags.numel() - k]
    keep = (mags > kth) | first_in_flat_order(mags == kth, k - int((mags > kth).sum()))
    return torch.where(keep, delta, torch.zeros_like(delta))


def ref_outliers(delta, density, gamma):
    """Breadcrumbs: in ascending |delta| order drop the top gamma and the bottom, keep int(density * n).

    Elements tied with either end of the kept band: the first ones in row-major order are kept.
    """
    if density >= 1:
        return delta.clone()
    mags = delta.abs()
    n = delta.numel()
    target = int(density * n)
    first = max(0, n - target - int(gamma * n))
    last = min(first + target, n) - 1
    if last < first:
        return torch.zeros_like(delta)
    ordered = ascending(mags)
    lo, hi = ordered[first], ordered[last]
    keep = (mags > lo) & (mags < hi)
    if lo == hi:
        keep |= first_in_flat_order(mags == lo, last - first + 1)
    else:
        # ascending positions of a tie class v: [#(< v), #(<= v) - 1]
        keep |= first_in_flat_order(mags == lo, int((mags <= lo).sum()) - first)
        keep |= first_in_flat_order(mags == hi, last - int((mags < hi).sum()) + 1)
    return torch.where(keep, delta, torch.zeros_like(delta))


def ref_random(delta, density, u):
    """DARE: each element survives when its uniform draw is below density."""
    if density >= 1:
        return delta.clone()
    return torch.where(u < density, delta, torch.zeros_like(delta))


def ref_della(delta, density, epsilon, u):
    """DELLA MagPrune: keep probability density - eps + 2 eps * (rank within the row / (row length - 1))."""
    if density >= 1:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    mags = delta.abs() if delta.dim() >= 2 else delta.abs().reshape(1, -1)
    order = torch.argsort(mags, dim=1, stable=True)  # rank = position in the (stable) ascending order
    positions = torch.arange(mags.shape[1], dtype=torch.float32).reshape(1, -1, *([1] * (mags.dim() - 2)))
    ranks = torch.empty_like(mags).scatter_(1, order, positions.expand_as(mags))
    length = mags.shape[1]
    rank_norm = ranks / (length - 1) if length > 1 else torch.full_like(ranks, 0.5)
    probs = ((density - epsilon) + rank_norm * 2 * epsilon).reshape(delta.shape)
    return torch.where(u < probs, delta, torch.zeros_like(delta))


def ref_rescale(original, kept):
    """mergekit's L1 rescaling (no rescaling when either norm is below 1e-7)."""
    before = original.abs().to(torch.float64).sum()
    after = kept.abs().to(torch.float64).sum()
    if float(before) < 1e-7 or float(after) < 1e-7:
        return kept
    return kept * (before.float() / after.float())


def ref_gta(method, base, models, mps, params=None, seed=0):
    """The generalized task arithmetic merge, written out from its definition."""
    params = params or {}
    normalize, rescale = DEFAULTS[method]
    normalize = params.get("normalize", normalize)
    rescale = params.get("rescale", rescale)
    lam = params.get("lambda", 1.0)
    kind = SPARSIFIER[method]
    deltas, weights = [], []
    for i, (m, mp) in enumerate(zip(models, mps)):
        delta = m - base
        density = mp.get("density", 1.0)
        kept = delta
        if kind == "magnitude":
            kept = ref_magnitude(delta, density)
        elif kind == "magnitude_outliers":
            kept = ref_outliers(delta, density, mp.get("gamma", 0.01))
        elif kind == "random":
            kept = ref_random(delta, density, uniform(seed, f"dare/{i}", delta.shape))
        elif kind == "della_magprune":
            kept = ref_della(delta, density, mp.get("epsilon", 0.15), uniform(seed, f"della/{i}", delta.shape))
        if kind is not None and density < 1 and rescale:
            kept = ref_rescale(delta, kept)
        w = mp.get("weight", 1.0)
        deltas.append(kept * w)
        weights.append(w)
    if method in CONSENSUS:
        if params.get("consensus_method", "sum") == "sum":
            elect = sum(deltas[1:], deltas[0])
        else:
            elect = sum((torch.sign(d) for d in deltas[1:]), torch.sign(deltas[0]))
        majority = torch.where(elect >= 0, 1.0, -1.0)
        masks = [torch.sign(d) == majority for d in deltas]
        mixed = sum((d * mk for d, mk in zip(deltas[1:], masks[1:])), deltas[0] * masks[0])
        divisor = sum((w * mk for w, mk in zip(weights[1:], masks[1:])), weights[0] * masks[0].float())
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(deltas[1:], deltas[0])
        divisor = sum(weights)
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def ref_sce(base, models, select_topk=1.0):
    """SCE: select top-k variance elements, weight by mean squared task vector, erase minority signs."""
    tvs = torch.stack([m - base for m in models])
    if select_topk < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk)
        if k <= 0 or select_topk <= 0:
            tvs = tvs * 0
        else:
            kth = ascending(var)[var.numel() - k]
            keep = (var > kth) | first_in_flat_order(var == kth, k - int((var > kth).sum()))
            tvs = tvs * keep
    majority = torch.where(tvs.sum(0) >= 0, 1.0, -1.0)
    mask = torch.sign(tvs) == majority
    weights = tvs.square().reshape(len(models), -1).to(torch.float64).mean(1).float()
    weights = torch.full_like(weights, 1 / len(models)) if weights.sum() < 1e-6 else weights / weights.sum()
    w = weights.reshape(-1, *([1] * base.dim())) * mask
    return base + (tvs * w).sum(0) / w.sum(0).clamp(min=1e-6)


def ours(method, base, models, mps=None, params=None, seed=0, chunk_rows=None):
    return merge_tensors(
        method, models, base=base, params=params or {}, model_params=mps, name=NAME, seed=seed, chunk_rows=chunk_rows
    )


def assert_matches(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- 1. differential tests

SHAPES = [(1000,), (64, 48), (3, 5, 7)]


@pytest.mark.parametrize("method", GTA)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gta_matches_reference(method, shape):
    base, models = inputs(shape, seed=sum(shape))
    mps = model_params(method)
    assert_matches(ours(method, base, models, mps, seed=5), ref_gta(method, base, models, mps, seed=5))


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {"normalize": True, "lambda": 0.7}),
        ("ties", {"rescale": True}),
        ("ties", {"normalize": False, "lambda": 1.5, "int8_mask": True}),
        ("ties", {"consensus_method": "count"}),
        ("dare_linear", {"rescale": False}),
        ("dare_ties", {"normalize": True, "consensus_method": "count"}),
        ("breadcrumbs", {"rescale": True, "normalize": True}),
        ("breadcrumbs_ties", {"normalize": True, "lambda": 0.5}),
        ("della", {"rescale": False, "normalize": False}),
        ("della_linear", {"normalize": True}),
    ],
)
def test_gta_global_parameters_match_reference(method, params):
    base, models = inputs((40, 30), seed=3)
    mps = model_params(method)
    assert_matches(ours(method, base, models, mps, params), ref_gta(method, base, models, mps, params))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_gta_negative_and_zero_weights_match_reference(method):
    base, models = inputs((50, 20), seed=9)
    mps = model_params(method)
    mps[1]["weight"] = -0.6
    mps[2]["weight"] = 0.0
    params = {"normalize": True}
    assert_matches(ours(method, base, models, mps, params), ref_gta(method, base, models, mps, params))


@pytest.mark.parametrize("method", ALL)
def test_matches_reference_and_chunks_on_a_tensor_over_2_20_elements(method):
    # two real blocks in prepare (four statistics pieces each); chunk_rows=1 merges block by block
    shape = (16400, 64)
    base, models = inputs(shape, n=2, seed=11)
    if method == "sce":
        params, mps = {"select_topk": 0.3}, None
        ref = ref_sce(base, models, 0.3)
    else:
        params, mps = {}, model_params(method, n=2)
        ref = ref_gta(method, base, models, mps, seed=1)
    whole = ours(method, base, models, mps, params, seed=1)
    assert_matches(whole, ref)
    assert torch.equal(ours(method, base, models, mps, params, seed=1, chunk_rows=1), whole)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.07])
def test_sce_matches_reference(shape, topk):
    base, models = inputs(shape, seed=2)
    assert_matches(ours("sce", base, models, params={"select_topk": topk}), ref_sce(base, models, topk))


def test_sce_select_nothing_returns_base():
    base, models = inputs((20, 10))
    assert torch.equal(ours("sce", base, models, params={"select_topk": 0.0}), base)


# --------------------------------------------------------------------------- 2. defining properties


def test_task_arithmetic_is_base_plus_weighted_task_vectors():
    base, models = inputs((30, 40))
    out = ours("task_arithmetic", base, models, [{"weight": 0.5}, {"weight": -1.0}, {"weight": 2.0}])
    expected = base + (((models[0] - base) * 0.5 + (models[1] - base) * -1.0) + (models[2] - base) * 2.0)
    assert torch.equal(out, expected)


def test_task_arithmetic_with_zero_weight_returns_base():
    base, models = inputs((30, 40))
    out = ours("task_arithmetic", base, models, [{"weight": 0.0}] * 3)
    assert torch.equal(out, base)


def test_task_arithmetic_normalize_of_one_model_with_weight_one_returns_the_model_delta():
    base, models = inputs((30, 40), n=1)
    out = ours("task_arithmetic", base, models, [{"weight": 1.0}], {"normalize": True})
    assert torch.equal(out, base + (models[0] - base))


def test_ties_with_density_one_and_one_model_equals_task_arithmetic():
    base, models = inputs((64, 64), n=1)
    for w in (1.0, 0.4):
        ties = ours("ties", base, models, [{"weight": w, "density": 1.0}], {"normalize": False})
        ta = ours("task_arithmetic", base, models, [{"weight": w}])
        assert torch.equal(ties, ta)
    # normalized, one model: its whole task vector (weight divides out)
    out = ours("ties", base, models, [{"weight": 1.0, "density": 1.0}])
    assert torch.equal(out, ours("task_arithmetic", base, models, [{"weight": 1.0}]))


def test_ties_trims_to_top_k_magnitudes():
    base = torch.zeros(10)
    model = torch.tensor([0.1, -0.9, 0.3, 0.0, -0.5, 0.7, 0.2, -0.05, 0.6, 0.4])
    out = ours("ties", base, [model], [{"weight": 1.0, "density": 0.3}])
    assert torch.equal(out, torch.tensor([0, -0.9, 0, 0, 0, 0.7, 0, 0, 0.6, 0]))
    # k = max(1, int(density * n)): a tiny density keeps the largest element
    out = ours("ties", base, [model], [{"weight": 1.0, "density": 0.01}])
    assert torch.equal(out, torch.tensor([0, -0.9, 0, 0, 0, 0, 0, 0, 0, 0]))
    # exactly k survive: among magnitudes tied with the k-th largest, the first ones in row-major order
    tied = torch.tensor([0.5, -0.5, 0.5, 0.1, 0.2])
    out = ours("ties", torch.zeros(5), [tied], [{"weight": 1.0, "density": 0.4}])
    assert torch.equal(out, torch.tensor([0.5, -0.5, 0, 0, 0]))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "sce"])
def test_exactly_k_survive_with_heavily_tied_magnitudes(method):
    # bf16-like task vectors: a handful of distinct magnitudes, so tie classes straddle every threshold
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(300, 70)
    models = [torch.randint(-6, 7, (300, 70), generator=gen).float() * 2**-10 for _ in range(2)]
    n = base.numel()
    if method == "sce":
        out = ours("sce", base, models, params={"select_topk": 0.35})
        var = torch.var(torch.stack(models), dim=0, unbiased=False)
        selected = int((out != 0).sum())
        assert selected <= int(torch.count_nonzero(var) * 0.35)  # k selected, minus sign erasures
        assert_matches(out, ref_sce(base, models, 0.35))
        return
    mp = {"weight": 1.0, "density": 0.37}
    if method == "breadcrumbs":
        mp["gamma"] = 0.11
    out = ours(method, base, models[:1], [mp], {"normalize": False} if method == "ties" else {})
    nonzero = int((models[0] != 0).sum())
    expected = min(int(0.37 * n), nonzero) if method == "ties" else int(0.37 * n)
    kept = int((out != 0).sum())
    assert kept == expected or (method == "breadcrumbs" and kept <= expected)  # zeros kept in the band are 0
    ref = ref_gta(method, base, models[:1], [mp], {"normalize": False} if method == "ties" else {})
    assert torch.equal(out, ref)


def test_ties_sign_election_and_disjoint_mean():
    base = torch.zeros(4)
    models = [torch.tensor([1.0, 2.0, -1.0, 3.0]), torch.tensor([-3.0, 1.0, 1.0, -3.0])]
    mps = [{"weight": 1.0, "density": 1.0}] * 2
    out = ours("ties", base, models, mps)
    # sums: -2 (neg wins), 3 (pos), 0 (tie -> +), 0 (tie -> +)
    assert torch.equal(out, torch.tensor([-3.0, 1.5, 1.0, 3.0]))
    # counting signs instead: tie everywhere but element 1 -> +
    out = ours("ties", base, models, mps, {"consensus_method": "count"})
    assert torch.equal(out, torch.tensor([1.0, 1.5, 1.0, 3.0]))
    # no normalization: sum of the agreeing deltas
    out = ours("ties", base, models, mps, {"normalize": False})
    assert torch.equal(out, torch.tensor([-3.0, 3.0, 1.0, 3.0]))


def test_ties_zero_density_returns_base():
    base, models = inputs((20, 20))
    assert torch.equal(ours("ties", base, models, [{"weight": 1.0, "density": 0.0}] * 3), base)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear", "breadcrumbs"])
def test_density_one_equals_task_arithmetic(method):
    base, models = inputs((33, 17))
    mps = [{"weight": w, "density": 1.0} for w in (0.3, 0.5, 0.7)]
    assert torch.equal(ours(method, base, models, mps), ours("task_arithmetic", base, models, mps))


@pytest.mark.parametrize("method", ["dare_ties", "della", "breadcrumbs_ties"])
def test_density_one_equals_ties(method):
    base, models = inputs((33, 17))
    mps = [{"weight": w, "density": 1.0} for w in (0.3, 0.5, 0.7)]
    params = {"normalize": True}
    assert torch.equal(ours(method, base, models, mps, params), ours("ties", base, models, mps, params))


def test_breadcrumbs_without_outliers_is_magnitude_trimming():
    base, models = inputs((60, 50))
    mps = [{"weight": w, "density": d, "gamma": 0.0} for w, d in ((0.3, 0.5), (0.5, 0.2), (0.7, 0.9))]
    ties_mps = [{"weight": m["weight"], "density": m["density"]} for m in mps]
    assert torch.equal(
        ours("breadcrumbs_ties", base, models, mps), ours("ties", base, models, ties_mps, {"normalize": False})
    )


def test_breadcrumbs_drops_outliers_and_small_values():
    base = torch.zeros(10)
    model = torch.arange(1.0, 11.0) * torch.tensor([1, -1] * 5)  # magnitudes 1..10
    out = ours("breadcrumbs", base, [model], [{"weight": 1.0, "density": 0.5, "gamma": 0.2}])
    # ascending magnitudes: drop the top 2 (10, 9), keep the next 5 (8..4), drop 3..1
    expected = torch.where((model.abs() >= 4) & (model.abs() <= 8), model, torch.zeros(10))
    assert torch.equal(out, expected)
    # not enough room for both: fewer outliers are dropped
    out = ours("breadcrumbs", base, [model], [{"weight": 1.0, "density": 0.9, "gamma": 0.3}])
    assert torch.equal(out, torch.where(model.abs() <= 9, model, torch.zeros(10)))
    # ties at both ends: the first ones in row-major order survive, exactly the band's size in all
    tied = torch.tensor([1.0, 3.0, -2.0, 3.0, 2.0, 3.0, -2.0, 1.0, 4.0, 3.0])
    out = ours("breadcrumbs", base, [tied], [{"weight": 1.0, "density": 0.4, "gamma": 0.2}])
    # ascending: 1 1 2 2 2 3 3 3 3 4 -> drop top 2 (4, one 3), keep positions 4..7: one 2 and three 3s
    assert torch.equal(out, torch.tensor([0, 3.0, -2.0, 3.0, 0, 3.0, 0, 0, 0, 0]))


def test_dare_mean_over_seeds_approaches_the_task_vector():
    base, models = inputs((40, 25), n=1, zeros=0.0)
    delta = models[0] - base
    runs = torch.stack(
        [ours("dare_linear", base, models, [{"weight": 1.0, "density": 0.3}], seed=s) - base for s in range(300)]
    )
    single = float((runs[0] - delta).abs().mean() / delta.abs().mean())
    averaged = float((runs.mean(0) - delta).abs().mean() / delta.abs().mean())
    assert single > 1.0  # one draw keeps ~30% of the elements, scaled by ~1/0.3
    assert averaged < 0.12  # ~ sqrt((1 - p) / p / 300) * 0.8
    kept = (runs != 0).float().mean()
    assert abs(float(kept) - 0.3) < 0.01
    # without rescaling the expectation is density * delta
    runs = torch.stack(
        [
            ours("dare_linear", base, models, [{"weight": 1.0, "density": 0.3}], {"rescale": False}, seed=s) - base
            for s in range(300)
        ]
    )
    assert float((runs.mean(0) - 0.3 * delta).abs().mean() / delta.abs().mean()) < 0.04


def test_dare_rescale_preserves_the_l1_norm():
    base, models = inputs((64, 64), n=1)
    out = ours("dare_linear", base, models, [{"weight": 1.0, "density": 0.2}], seed=3)
    delta = models[0] - base
    assert math.isclose(float((out - base).abs().sum()), float(delta.abs().sum()), rel_tol=1e-4)


def test_della_keeps_large_magnitudes_more_often():
    base = torch.zeros(8, 50)
    model = torch.linspace(0.01, 1.0, 50).repeat(8, 1) * torch.tensor([1.0, -1.0]).repeat(25)
    mp = [{"weight": 1.0, "density": 0.5, "epsilon": 0.3}]
    kept = torch.stack([ours("della_linear", base, [model], mp, seed=s) != 0 for s in range(300)]).float().mean(0)
    per_rank = kept.mean(0)  # keep frequency by magnitude rank (8 rows x 300 seeds)
    assert abs(float(per_rank[0]) - 0.2) < 0.05  # density - epsilon
    assert abs(float(per_rank[-1]) - 0.8) < 0.05  # density + epsilon
    assert abs(float(per_rank.mean()) - 0.5) < 0.02
    slope = torch.linalg.lstsq(torch.linspace(0, 1, 50).unsqueeze(1), (per_rank - 0.2).unsqueeze(1)).solution
    assert abs(float(slope) - 0.6) < 0.05


def test_della_mean_over_seeds_approaches_its_expectation():
    base, models = inputs((30, 40), n=1, zeros=0.0)
    delta = models[0] - base
    density, epsilon = 0.4, 0.2
    mp = [{"weight": 1.0, "density": density, "epsilon": epsilon}]
    runs = torch.stack([ours("della_linear", base, models, mp, seed=s) - base for s in range(300)])
    # E = p_i * delta_i * L1 scale (mergekit rescales by norms, not by 1/p_i as in the paper)
    ranks = torch.argsort(torch.argsort(delta.abs(), dim=1), dim=1).float() / (delta.shape[1] - 1)
    p = density - epsilon + 2 * epsilon * ranks
    expected = p * delta * (delta.abs().sum() / (p * delta.abs()).sum())
    assert float((runs.mean(0) - expected).abs().mean() / delta.abs().mean()) < 0.1
    assert float((runs.mean(0) - delta).abs().mean() / delta.abs().mean()) > 0.15  # not the paper's 1/p_i


def test_sce_of_one_model_is_that_model():
    base, models = inputs((30, 30), n=1)
    torch.testing.assert_close(ours("sce", base, models), models[0], rtol=0, atol=1e-6)


def test_sce_weights_models_by_mean_squared_task_vector():
    base = torch.zeros(4)
    models = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, -2.0, 2.0])]
    out = ours("sce", base, models)
    # weights 1/5 and 4/5; element 2: sum -1 -> only the negative model survives
    assert torch.allclose(out, torch.tensor([1.8, 1.8, -2.0, 1.8]))


def test_int8_mask_changes_nothing():
    base, models = inputs((40, 40))
    for method in ("ties", "dare_ties", "sce"):
        mps = None if method == "sce" else model_params(method)
        a = ours(method, base, models, mps, {"int8_mask": True})
        b = ours(method, base, models, mps, {"int8_mask": False})
        assert torch.equal(a, b)


def test_lambda_scales_the_merged_task_vector():
    base, models = inputs((20, 20))
    mps = model_params("ties")
    one = ours("ties", base, models, mps)
    half = ours("ties", base, models, mps, {"lambda": 0.5})
    torch.testing.assert_close(half - base, (one - base) * 0.5, rtol=1e-5, atol=1e-6)


def test_zero_and_one_dimensional_and_empty_tensors():
    for method in ALL:
        base, models = torch.tensor(0.5), [torch.tensor(0.75), torch.tensor(0.25)]
        mps = None if method == "sce" else model_params(method, n=2)
        out = ours(method, base, models, mps)
        assert out.shape == () and torch.isfinite(out)
        base, models = torch.zeros(0, 4), [torch.zeros(0, 4)] * 2
        assert ours(method, base, models, mps).shape == (0, 4)


def test_one_element_rows_are_kept_with_probability_density():
    base = torch.zeros(400, 1)
    model = torch.ones(400, 1)
    out = ours("della_linear", base, [model], [{"weight": 1.0, "density": 0.5, "epsilon": 0.3}], {"rescale": False})
    assert 0.4 < float((out != 0).float().mean()) < 0.6


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("method", GTA)
def test_parameters_have_mergekit_names_and_defaults(method):
    desc = REGISTRY[method].describe()
    glob = {p["name"]: p["default"] for p in desc["parameters"]}
    per_model = {p["name"]: p["default"] for p in desc["model_parameters"]}
    normalize, rescale = DEFAULTS[method]
    assert glob["normalize"] is normalize and glob["rescale"] is rescale
    assert glob["lambda"] == 1.0 and glob["int8_mask"] is False
    assert ("consensus_method" in glob) == (method in CONSENSUS)
    assert per_model["weight"] == 1.0 and per_model["density"] == 1.0
    assert per_model.get("gamma") == (0.01 if method.startswith("breadcrumbs") else None)
    assert per_model.get("epsilon") == (0.15 if method.startswith("della") else None)
    assert desc["base_model"] == "required" and desc["streams_in_chunks"]
    assert desc["stochastic"] == (method in {"dare_linear", "dare_ties", "della", "della_linear"})
    assert all(p["description"] for p in desc["parameters"] + desc["model_parameters"])


def test_sce_parameters():
    desc = REGISTRY["sce"].describe()
    assert {p["name"]: p["default"] for p in desc["parameters"]} == {"int8_mask": False, "select_topk": 1.0}
    assert desc["model_parameters"] == []


def test_della_rejects_an_epsilon_outside_the_density():
    base, models = inputs((10, 10), n=1)
    with pytest.raises(RecipeError, match="epsilon"):
        ours("della", base, models, [{"density": 0.5, "epsilon": 0.5}])
    # density >= 1 never sparsifies, so epsilon is not checked (as in mergekit)
    ours("della", base, models, [{"density": 1.0, "epsilon": 0.5}])


def test_unknown_parameters_are_rejected():
    base, models = inputs((10, 10), n=1)
    with pytest.raises(RecipeError, match="gamma"):
        ours("ties", base, models, [{"gamma": 0.1}])
    with pytest.raises(RecipeError, match="consensus_method"):
        ours("task_arithmetic", base, models, None, {"consensus_method": "sum"})
    with pytest.raises(RecipeError):
        ours("ties", base, models, None, {"consensus_method": "median"})
