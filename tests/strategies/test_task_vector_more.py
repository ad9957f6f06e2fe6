"""negative, split_unlearn, adarank, dam, dual_projection, weight_scope_alignment, safe_merge, led_merge."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convergent import determinism
from convergent.errors import MergeInputError, RecipeError
from convergent.strategies import merge_tensors
from convergent.strategies.adarank import kept_rank

NAME = "model.layers.1.self_attn.q_proj.weight"


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


def assert_chunk_invariant(method: str, models, chunks=(8, 16), **kwargs) -> torch.Tensor:
    whole = merge_tensors(method, models, **kwargs)
    for chunk in chunks:
        assert torch.equal(whole, merge_tensors(method, models, chunk_rows=chunk, **kwargs)), f"{method} chunk {chunk}"
    return whole


# ----------------------------------------------------------------------------- negative


def test_negative_matches_definition():
    base = rand(9, 4, seed=0)
    models = [rand(9, 4, seed=1), rand(9, 4, seed=2)]
    out = merge_tensors(
        "negative", models, base=base, params={"lambda": 0.7}, model_params=[{"weight": 1.0}, {"weight": 0.5}]
    )
    expected = base - 0.7 * ((models[0] - base) + 0.5 * (models[1] - base))
    torch.testing.assert_close(out, expected)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(-3.0, 3.0, allow_nan=False))
def test_negative_then_positive_returns_the_base(seed, lam):
    base = rand(6, 5, seed=seed)
    model = base + rand(6, 5, seed=seed + 1)
    negated = merge_tensors("negative", [model], base=base, params={"lambda": lam})
    # add the same task vector back (task arithmetic = negation with -lambda)
    restored = merge_tensors("negative", [negated + (model - base)], base=negated, params={"lambda": -lam})
    torch.testing.assert_close(restored, base, rtol=1e-5, atol=1e-5)


def test_negative_chunked_equals_whole():
    base = rand(37, 8, seed=0)
    models = [rand(37, 8, seed=i) for i in (1, 2, 3)]
    assert_chunk_invariant("negative", models, base=base, params={"lambda": 1.3})


# ----------------------------------------------------------------------------- split_unlearn


def split_reference(base, models, forget, weights, lam, forget_lam, orthogonalize=True):
    tvs = [(m - base).double() for m in models]
    tau_r = sum((w * t for t, f, w in zip(tvs, forget, weights) if not f), torch.zeros_like(tvs[0]))
    tau_f = sum((w * t for t, f, w in zip(tvs, forget, weights) if f), torch.zeros_like(tvs[0]))
    if orthogonalize and (tau_r * tau_r).sum() > 0:
        tau_f = tau_f - (tau_f * tau_r).sum() / (tau_r * tau_r).sum() * tau_r
    return (base.double() + lam * tau_r - forget_lam * tau_f).float()


def test_split_unlearn_matches_reference_and_streams():
    base = rand(37, 8, seed=0)
    models = [rand(37, 8, seed=i) for i in (1, 2, 3, 4)]
    forget = [False, True, False, True]
    weights = [1.0, 0.5, 2.0, 1.0]
    kwargs = dict(
        base=base,
        params={"lambda": 0.8, "forget_lambda": 1.5},
        model_params=[{"forget": f, "weight": w} for f, w in zip(forget, weights)],
    )
    out = assert_chunk_invariant("split_unlearn", models, **kwargs)
    torch.testing.assert_close(out, split_reference(base, models, forget, weights, 0.8, 1.5), rtol=1e-5, atol=1e-5)


def test_split_unlearn_forget_direction_is_orthogonal_to_retained():
    base = rand(10, 6, seed=0)
    retain, forget = rand(10, 6, seed=1), rand(10, 6, seed=2)
    out = merge_tensors(
        "split_unlearn",
        [retain, forget],
        base=base,
        params={"lambda": 0.0},
        model_params=[{"forget": False}, {"forget": True}],
    )
    removed = (out - base).double()
    assert abs(float((removed * (retain - base).double()).sum())) < 1e-4
    plain = merge_tensors(
        "split_unlearn",
        [retain, forget],
        base=base,
        params={"lambda": 0.0, "orthogonalize": False},
        model_params=[{"forget": False}, {"forget": True}],
    )
    torch.testing.assert_close(plain, base - (forget - base))


def test_split_unlearn_without_forget_models_is_task_arithmetic():
    base = rand(5, 5, seed=0)
    models = [rand(5, 5, seed=1), rand(5, 5, seed=2)]
    out = merge_tensors("split_unlearn", models, base=base, params={"lambda": 0.5})
    torch.testing.assert_close(out, base + 0.5 * ((models[0] - base) + (models[1] - base)))


# ----------------------------------------------------------------------------- adarank


def adarank_reference(base, models, lam, energy, rank_ratio, origin="pretrained"):
    o = base.double() if origin == "pretrained" else sum(m.double() for m in models) / len(models)
    out = o.clone()
    for m in models:
        tau = m.double() - o
        if tau.dim() == 2:
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)
            e = s**2
            k = next(j + 1 for j in range(len(s)) if e[: j + 1].sum() >= energy * e.sum() * (1 - 1e-12))
            k = min(k, max(1, int(rank_ratio * len(s))))
            tau = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        out = out + lam * tau
    return out.float()


def test_adarank_full_rank_is_task_arithmetic():
    base = rand(8, 6, seed=0)
    models = [rand(8, 6, seed=i) for i in (1, 2, 3)]
    out = merge_tensors("adarank", models, base=base, params={"lambda": 0.3, "energy": 1.0, "rank_ratio": 1.0})
    torch.testing.assert_close(out, base + 0.3 * sum(m - base for m in models))


@pytest.mark.parametrize(("energy", "rank_ratio", "origin"), [(0.8, 1.0, "pretrained"), (0.95, 0.5, "average")])
def test_adarank_matches_reference(energy, rank_ratio, origin):
    base = rand(12, 9, seed=0)
    models = [base + rand(12, 9, seed=i) for i in (1, 2, 3)]
    params = {"lambda": 0.4, "energy": energy, "rank_ratio": rank_ratio, "origin": origin}
    out = merge_tensors("adarank", models, base=base, params=params)
    expected = adarank_reference(base, models, 0.4, energy, rank_ratio, origin)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_adarank_rank_rule():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])  # energies 16, 4, 1, 1 of 22
    assert kept_rank(s, 16 / 22, 1.0) == 1
    assert kept_rank(s, 0.8, 1.0) == 2
    assert kept_rank(s, 21 / 22, 1.0) == 3
    assert kept_rank(s, 1.0, 1.0) == 4
    assert kept_rank(s, 1.0, 0.4) == 2
    assert kept_rank(torch.zeros(3), 0.9, 1.0) == 0


def test_adarank_adds_full_task_vector_for_vectors():
    base = rand(7, seed=0)
    models = [rand(7, seed=1), rand(7, seed=2)]
    out = merge_tensors("adarank", models, base=base, params={"lambda": 0.5, "energy": 0.1})
    torch.testing.assert_close(out, base + 0.5 * ((models[0] - base) + (models[1] - base)))


# ----------------------------------------------------------------------------- dam


def test_dam_scalar_and_default_coefficients():
    models = [rand(6, 4, seed=i) for i in range(3)]
    out = merge_tensors("dam", models, model_params=[{"merger": 0.2}, {"merger": 0.5}, {"merger": -1.0}])
    torch.testing.assert_close(out, 0.2 * models[0] + 0.5 * models[1] - models[2])
    torch.testing.assert_close(merge_tensors("dam", models), sum(models) / 3)


def test_dam_per_column_coefficients_with_non_linearity():
    models = [rand(37, 8, seed=i) for i in range(2)]
    c = [[0.1 * j for j in range(8)], [1.0 - 0.1 * j for j in range(8)]]
    kwargs = dict(params={"non_linearity": "tanh"}, model_params=[{"merger": c[0]}, {"merger": c[1]}])
    out = assert_chunk_invariant("dam", models, **kwargs)
    expected = sum(torch.tanh(torch.tensor(ci))[None, :] * m for ci, m in zip(c, models))
    torch.testing.assert_close(out, expected)


def test_dam_per_element_coefficients_on_vectors_stream():
    models = [rand(130, seed=i) for i in range(2)]
    c = [[float(j % 7) for j in range(130)], [0.5] * 130]
    kwargs = dict(params={"non_linearity": "sigmoid"}, model_params=[{"merger": c[0]}, {"merger": c[1]}])
    whole = merge_tensors("dam", models, **kwargs)
    assert torch.equal(whole, merge_tensors("dam", models, chunk_rows=64, **kwargs))
    expected = sum(torch.sigmoid(torch.tensor(ci)) * m for ci, m in zip(c, models))
    torch.testing.assert_close(whole, expected)


def test_dam_wrong_number_of_coefficients():
    models = [rand(6, 4, seed=i) for i in range(2)]
    with pytest.raises(MergeInputError, match="columns"):
        merge_tensors("dam", models, model_params=[{"merger": [1.0, 2.0]}, {}], name=NAME)


# ----------------------------------------------------------------------------- dual_projection


def dual_reference(base, models, alpha, projection="both", lam=1.0):
    tvs = [(m - base).double() for m in models]
    merged = tvs[0].clone()
    for tau in tvs[1:]:
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        ratio = torch.cumsum(s, 0) / s.sum()
        r = int((ratio < alpha - 1e-12).sum()) + 1 if alpha > 0 else 0
        r = min(r, int((s > s[0] * 1e-6).sum()))
        p_left = torch.eye(tau.shape[0], dtype=torch.float64) - u[:, :r] @ u[:, :r].T
        p_right = torch.eye(tau.shape[1], dtype=torch.float64) - vh[:r].T @ vh[:r]
        if projection in ("both", "left"):
            tau = p_left @ tau
        if projection in ("both", "right"):
            tau = tau @ p_right
        merged = merged + tau
    return (base.double() + lam * merged).float()


def test_dual_projection_leaves_orthogonal_task_vector_unchanged():
    base = rand(10, 8, seed=0)
    q_out, _ = torch.linalg.qr(rand(10, 10, seed=1))
    q_in, _ = torch.linalg.qr(rand(8, 8, seed=2))
    # earlier task lives in the first 3 output/input directions, the new one in the next 3
    tau1 = q_out[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ q_in[:, :3].T
    tau2 = q_out[:, 3:6] @ torch.diag(torch.tensor([2.5, 1.5, 0.5])) @ q_in[:, 3:6].T
    for alpha in (0.5, 1.0):
        for projection in ("both", "left", "right"):
            out = merge_tensors(
                "dual_projection",
                [base + tau1, base + tau2],
                base=base,
                params={"alpha": alpha, "projection": projection},
            )
            torch.testing.assert_close(out, base + tau1 + tau2, rtol=1e-5, atol=1e-5)


def test_dual_projection_removes_the_protected_subspace():
    base = rand(10, 8, seed=0)
    tau1 = rand(10, 8, seed=1)
    model2 = base + tau1 * 0.5 + rand(10, 8, seed=2)
    out = merge_tensors("dual_projection", [base + tau1, model2], base=base, params={"alpha": 1.0})
    # with alpha = 1 the whole (full-rank) earlier subspace is protected: nothing of task 2 gets through
    torch.testing.assert_close(out, base + tau1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("projection", ["both", "left", "right"])
def test_dual_projection_matches_reference(projection):
    base = rand(12, 7, seed=0)
    models = [base + rand(12, 7, seed=i) for i in (1, 2, 3)]
    # order: the third model first, then the first, then the second
    mps = [{"order": 1}, {"order": 2}, {"order": 0}]
    out = merge_tensors(
        "dual_projection",
        models,
        base=base,
        params={"alpha": 0.6, "projection": projection, "lambda": 0.7},
        model_params=mps,
    )
    expected = dual_reference(base, [models[2], models[0], models[1]], 0.6, projection, lam=0.7)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_dual_projection_vectors_and_rescale():
    base = rand(6, seed=0)
    models = [rand(6, seed=1), rand(6, seed=2)]
    out = merge_tensors("dual_projection", models, base=base)
    torch.testing.assert_close(out, base + (models[0] - base) + (models[1] - base))
    base2 = rand(9, 5, seed=3)
    models2 = [base2 + rand(9, 5, seed=i) for i in (4, 5, 6)]
    out2 = merge_tensors("dual_projection", models2, base=base2, params={"rescale": True})
    mean_norm = sum(float(torch.linalg.vector_norm(m - base2)) for m in models2) / 3
    assert abs(float(torch.linalg.vector_norm(out2 - base2)) - mean_norm) < 1e-4


# ----------------------------------------------------------------------------- weight_scope_alignment


def wsa_reference(base, models, weights, lam):
    xs = [(m - base).double() if base is not None else m.double() for m in models]
    mus = [x.mean() for x in xs]
    sigmas = [x.std(unbiased=False) for x in xs]
    total = sum(weights)
    mu_t = sum(w * m for w, m in zip(weights, mus)) / total
    sigma_t = sum(w * s for w, s in zip(weights, sigmas)) / total
    merged = sum(w * ((x - m) / s * sigma_t + mu_t) for w, x, m, s in zip(weights, xs, mus, sigmas)) / total
    return (merged if base is None else base.double() + lam * merged).float()


def test_weight_scope_alignment_matches_reference_and_streams():
    base = rand(37, 8, seed=0)
    models = [base + 0.1 * rand(37, 8, seed=1) + 0.3, base + 2.0 * rand(37, 8, seed=2), base + rand(37, 8, seed=3)]
    weights = [1.0, 2.0, 0.5]
    kwargs = dict(base=base, params={"lambda": 0.9}, model_params=[{"weight": w} for w in weights])
    out = assert_chunk_invariant("weight_scope_alignment", models, **kwargs)
    torch.testing.assert_close(out, wsa_reference(base, models, weights, 0.9), rtol=1e-5, atol=1e-5)
    # without a base model the weights themselves are aligned
    plain = assert_chunk_invariant("weight_scope_alignment", models, model_params=[{"weight": w} for w in weights])
    torch.testing.assert_close(plain, wsa_reference(None, models, weights, 1.0), rtol=1e-5, atol=1e-5)


def test_weight_scope_alignment_gives_models_the_fused_scope():
    base = torch.zeros(20, 5)
    narrow, wide = 0.1 * rand(20, 5, seed=1), 3.0 * rand(20, 5, seed=2)
    one = merge_tensors("weight_scope_alignment", [narrow], base=base)
    torch.testing.assert_close(one, narrow, rtol=1e-5, atol=1e-6)  # a single model keeps its own scope
    out = merge_tensors("weight_scope_alignment", [narrow, narrow], base=base, model_params=[{}, {}])
    torch.testing.assert_close(out, narrow, rtol=1e-5, atol=1e-6)
    both = merge_tensors("weight_scope_alignment", [narrow, wide], base=base)
    target = (narrow.std(unbiased=False) + wide.std(unbiased=False)) / 2
    # each aligned input has the target std; their average is no wider than that
    assert float(both.std(unbiased=False)) <= float(target) + 1e-5


# ----------------------------------------------------------------------------- safe_merge


def safelora_cos(v, d):
    v, d = v.double(), d.double()
    c = v @ v.T / torch.linalg.matrix_norm(v)
    cd = c @ d
    return float((cd * d).sum() / (torch.linalg.vector_norm(cd) * torch.linalg.vector_norm(d)))


def test_safe_merge_follows_the_cosine_rule():
    base = rand(8, 6, seed=0)
    unaligned = base - rand(8, 6, seed=1)
    v = base - unaligned
    safe = base + rand(8, 6, seed=2)
    aligned_ft = base + v @ torch.diag(torch.linspace(0.5, 1.5, 6))  # update inside span(V)
    q, _ = torch.linalg.qr(v)
    off = rand(8, 6, seed=3)
    off_ft = base + (off - q @ (q.T @ off)) * 0.1 + 0.01 * v  # mostly outside span(V) (V spans 6 of 8 dims)
    roles = [{"role": "finetuned"}, {"role": "safe"}, {"role": "unaligned"}]
    params = {"threshold": 0.35, "finetuned_weight": 0.7, "safe_weight": 0.3}
    for ft in (aligned_ft, off_ft):
        out = merge_tensors("safe_merge", [ft, safe, unaligned], base=base, params=params, model_params=roles)
        if safelora_cos(v, ft - base) >= 0.35:
            assert torch.equal(out, ft)
        else:
            torch.testing.assert_close(out, base + 0.7 * (ft - base) + 0.3 * (safe - base))
    assert safelora_cos(v, aligned_ft - base) >= 0.35 > safelora_cos(v, off_ft - base)


def test_safe_merge_without_unaligned_uses_the_safety_update_and_keeps_vectors():
    base = rand(5, 12, seed=0)
    safe = base + rand(5, 12, seed=1)
    ft = base + rand(5, 12, seed=2)
    params = {"threshold": 2.0}  # cosine is never >= 2: always merge
    roles = [{"role": "safe"}, {"role": "finetuned"}]
    out = merge_tensors("safe_merge", [safe, ft], base=base, params=params, model_params=roles)
    torch.testing.assert_close(out, base + 0.8 * (ft - base) + 0.2 * (safe - base))
    params = {"threshold": -2.0}  # never merge
    out = merge_tensors("safe_merge", [safe, ft], base=base, params=params, model_params=roles)
    assert torch.equal(out, ft)
    vb, vs, vf = rand(5, seed=3), rand(5, seed=4), rand(5, seed=5)
    out = merge_tensors("safe_merge", [vf, vs], base=vb, model_params=[{"role": "finetuned"}, {"role": "safe"}])
    assert torch.equal(out, vf)


def test_safe_merge_needs_its_roles():
    base = rand(4, 4, seed=0)
    with pytest.raises(RecipeError, match="finetuned"):
        merge_tensors("safe_merge", [base, base], base=base, model_params=[{"role": "safe"}, {"role": "unaligned"}])
    with pytest.raises(RecipeError, match="more than one"):
        merge_tensors("safe_merge", [base, base], base=base, model_params=[{"role": "safe"}, {"role": "safe"}])


# ----------------------------------------------------------------------------- led_merge


def led_reference(base, models, ft_scores, base_scores, densities, weights, disjoint=True):
    def top(score, density):
        k = round(density * score.numel())
        t = torch.topk(score.flatten(), k).values[-1]
        return score >= t

    masks = [top(f, d) & top(b, d) for f, b, d in zip(ft_scores, base_scores, densities)]
    if disjoint:
        count = sum(m.int() for m in masks)
        masks = [m & (count <= 1) for m in masks]
    out = base.clone()
    for m, mask, w in zip(models, masks, weights):
        out = out + w * torch.where(mask, m - base, torch.zeros_like(m))
    return out


def test_led_merge_matches_reference_and_streams():
    base = rand(29, 8, seed=0)
    models = [base + rand(29, 8, seed=i) for i in (1, 2, 3)]
    ft_scores = [rand(29, 8, seed=10 + i).abs() for i in range(3)]
    base_scores = [rand(29, 8, seed=20 + i).abs() for i in range(3)]
    densities, weights = [0.5, 0.3, 0.6], [1.0, 0.5, 2.0]
    kwargs = dict(
        base=base,
        model_params=[{"density": d, "weight": w} for d, w in zip(densities, weights)],
        extras={"importance": ft_scores, "base_importance": base_scores},
        name=NAME,
    )
    out = assert_chunk_invariant("led_merge", models, chunks=(16,), **kwargs)
    torch.testing.assert_close(out, led_reference(base, models, ft_scores, base_scores, densities, weights))
    no_disjoint = merge_tensors("led_merge", models, params={"disjoint": False}, **kwargs)
    expected = led_reference(base, models, ft_scores, base_scores, densities, weights, disjoint=False)
    torch.testing.assert_close(no_disjoint, expected)


def test_led_merge_without_statistics_uses_magnitudes():
    base = rand(16, 8, seed=0)
    models = [base + rand(16, 8, seed=i) for i in (1, 2)]
    out = merge_tensors("led_merge", models, base=base, model_params=[{"density": 0.5}] * 2)
    expected = led_reference(base, models, [m.abs() for m in models], [base.abs()] * 2, [0.5, 0.5], [1.0, 1.0])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("chunk_rows", [None, 8])
def test_led_merge_bad_statistics_name_contribution_and_tensor(chunk_rows):
    base = rand(16, 8, seed=0)
    models = [base + rand(16, 8, seed=i) for i in (1, 2)]
    s = rand(16, 8, seed=5).abs()
    with pytest.raises(MergeInputError) as err:
        merge_tensors(
            "led_merge", models, base=base, extras={"importance": [s, None]}, name=NAME, chunk_rows=chunk_rows
        )
    assert "contribution 1" in str(err.value) and NAME in str(err.value)
    with pytest.raises(MergeInputError) as err:
        merge_tensors(
            "led_merge",
            models,
            base=base,
            extras={"importance": [s, s], "base_importance": [torch.ones(16, 9), s]},
            name=NAME,
            chunk_rows=chunk_rows,
        )
    assert "contribution 0" in str(err.value) and NAME in str(err.value) and "shape" in str(err.value)


def test_new_strategies_describe_themselves():
    from convergent.strategies import get_strategy

    for name in ("negative", "split_unlearn", "adarank", "dam", "dual_projection", "weight_scope_alignment"):
        d = get_strategy(name).describe()
        assert d["family"] == "task-vector" and d["paper"]
        assert all(p["description"] for p in d["parameters"] + d["model_parameters"])
    assert {p["name"] for p in get_strategy("negative").describe()["parameters"]} == {"lambda"}
    for name in ("adarank", "dual_projection", "safe_merge"):
        assert not get_strategy(name).describe()["streams_in_chunks"]
