"""slerp, nuslerp, multislerp, karcher, model_stock: references, properties, chunk invariance.

The references below are written from the definitions (mergekit 0.1.5's
semantics, the Model Stock paper) as plain whole-tensor float64 code, without
the coefficient/Gram-matrix reformulation the strategies use.
"""

from __future__ import annotations

import math

import pytest
import torch

from convergent import determinism
from convergent.errors import MergeInputError
from convergent.strategies import merge_tensors

SHAPES = [(37,), (12, 9), (5, 4, 6)]
BIG = (2100, 512)  # > 2**20 elements: two blocks of 2048 rows


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _finetunes(shape, k: int, seed: int, spread: float = 0.3):
    gen = _gen(seed)
    base = torch.randn(shape, generator=gen)
    return base, [base + spread * torch.randn(shape, generator=gen) for _ in range(k)]


def _random(shape, k: int, seed: int):
    gen = _gen(seed)
    return [torch.randn(shape, generator=gen) for _ in range(k)]


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-6) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = float(want.abs().max()) if want.numel() else 1.0
    err = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), f"max abs error {err:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------ references


def ref_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    nx, ny = float(x.norm()), float(y.norm())
    nx = nx if nx > 1e-8 else 1.0
    ny = ny if ny > 1e-8 else 1.0
    dot = max(-1.0, min(1.0, float((x / nx) @ (y / ny))))
    if abs(dot) > 0.9995:
        out = (1 - t) * x + t * y
    else:
        theta = math.acos(dot)
        out = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
    return out.reshape(a.shape)


def ref_nuslerp(weights, v0, v1, base=None, row_wise=False, flatten=True) -> torch.Tensor:
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    a, b = v0.double(), v1.double()
    if base is not None:
        a, b = a - base.double(), b - base.double()
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    au = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    bu = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (au * bu).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(1 - cos**2 <= 1e-16, (1 - t) * a + t * b, out)
    if not flatten and row_wise:
        out = out.transpose(0, -1)
    out = out.reshape(shape)
    return out if base is None else out + base.double()


def ref_multislerp(models, weights, base=None, normalize=True, eps=1e-8) -> torch.Tensor:
    if len(models) == 1:
        return models[0].double()
    xs = [m.double().reshape(-1) - (0 if base is None else base.double().reshape(-1)) for m in models]
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = torch.stack([x.norm() for x in xs])
    units = [x / (n + eps) for x, n in zip(xs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    tn = tangent.norm() + eps
    out = (mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms * w).sum()
    out = out.reshape(models[0].shape)
    return out if base is None else out + base.double()


def ref_karcher(models, max_iter=10, tol=1e-5) -> torch.Tensor:
    """The Riemannian (Karcher) mean iteration on the sphere, vector by vector."""
    if len(models) == 1:
        return models[0].double()
    xs = [m.double().reshape(-1) for m in models]
    norms = [float(x.norm()) for x in xs]
    units = [x / n for x, n in zip(xs, norms) if n > tol]
    if not units:
        return torch.zeros(models[0].shape, dtype=torch.float64)
    alpha = 1.0 / len(units)
    mean = sum(alpha * u for u in units)
    mean = units[0].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = float((mean @ u).clamp(-1, 1))
            theta = math.acos(dot)
            if theta >= tol:
                tangent += alpha * theta / math.sin(theta) * (u - dot * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        if mean.norm() > tol:
            mean = mean / mean.norm()
    return (sum(norms) / len(models) * mean).reshape(models[0].shape)


def ref_model_stock(base, models, filter_wise=False) -> torch.Tensor:
    """Jang et al. 2024: t = k cos / (1 + (k - 1) cos) with the mean pairwise cosine of the offsets."""
    w0 = base.double()
    ws = [m.double() for m in models]
    if filter_wise and w0.dim() >= 2:

        def rows(x):
            return x.reshape(-1, w0.shape[-1])
    else:

        def rows(x):
            return x.reshape(1, -1)

    offsets = [rows(w - w0) for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            prod = (offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((offsets[i] * offsets[j]).sum(-1) / prod).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0)
    k = len(ws)
    t = k * cos / (1 + (k - 1) * cos)
    t = torch.where((1 + (k - 1) * cos).abs() < 1e-6, torch.zeros_like(t), t).unsqueeze(-1)
    return (t * rows(sum(ws) / k) + (1 - t) * rows(w0)).reshape(w0.shape)


# ------------------------------------------------------------------ slerp


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.25, 0.6, 1.0])
def test_slerp_matches_reference(shape, t):
    base, (ft,) = _finetunes(shape, 1, seed=1, spread=1.0)
    _close(merge_tensors("slerp", [ft], base=base, params={"t": t}), ref_slerp(t, base, ft))


def test_slerp_endpoints_are_exact():
    base, (other,) = _finetunes((20, 7), 1, seed=2, spread=1.0)
    assert torch.equal(merge_tensors("slerp", [other], base=base, params={"t": 0.0}), base)
    assert torch.equal(merge_tensors("slerp", [other], base=base, params={"t": 1.0}), other)


def test_slerp_stays_on_the_sphere_and_falls_back_to_linear():
    a = torch.zeros(8)
    a[0] = 1.0
    b = torch.zeros(8)
    b[1] = 1.0
    mid = merge_tensors("slerp", [b], base=a, params={"t": 0.5})
    torch.testing.assert_close(mid, (a + b) / math.sqrt(2))
    third = merge_tensors("slerp", [b], base=a, params={"t": 1 / 3})
    torch.testing.assert_close(third.norm(), torch.tensor(1.0))
    torch.testing.assert_close(third[:2], torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    # parallel and antiparallel inputs: plain linear interpolation
    v = torch.randn(50, generator=_gen(3))
    for other in (2.5 * v, -0.5 * v):
        out = merge_tensors("slerp", [other], base=v, params={"t": 0.3})
        torch.testing.assert_close(out, 0.7 * v + 0.3 * other)
    # zero vectors stay finite
    z = merge_tensors("slerp", [torch.zeros(5)], base=torch.zeros(5), params={"t": 0.5})
    assert torch.equal(z, torch.zeros(5))


def test_slerp_needs_base_and_one_model():
    x = torch.randn(4, 4)
    with pytest.raises(MergeInputError):
        merge_tensors("slerp", [x], params={"t": 0.5})
    with pytest.raises(MergeInputError):
        merge_tensors("slerp", [x, x], base=x, params={"t": 0.5})
    with pytest.raises(Exception, match="'t'"):
        merge_tensors("slerp", [x], base=x)


# ------------------------------------------------------------------ nuslerp


NUSLERP_MODES = [
    {"nuslerp_flatten": True},
    {"nuslerp_flatten": False},
    {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    {"nuslerp_flatten": True, "nuslerp_row_wise": True},
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", NUSLERP_MODES)
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_reference(shape, mode, with_base):
    base, models = _finetunes(shape, 2, seed=4, spread=1.0)
    weights = [0.7, 0.2]
    got = merge_tensors(
        "nuslerp",
        models,
        base=base if with_base else None,
        params=mode,
        model_params=[{"weight": w} for w in weights],
    )
    want = ref_nuslerp(
        weights,
        *models,
        base=base if with_base else None,
        row_wise=mode.get("nuslerp_row_wise", False),
        flatten=mode["nuslerp_flatten"],
    )
    _close(got, want)


def test_nuslerp_weights_and_task_vectors():
    base, (a, b) = _finetunes((6, 10), 2, seed=6, spread=1.0)
    first = merge_tensors("nuslerp", [a, b], model_params=[{"weight": 1.0}, {"weight": 0.0}])
    last = merge_tensors("nuslerp", [a, b], model_params=[{"weight": 0.0}, {"weight": 2.0}])
    _close(first, a.double())
    _close(last, b.double())
    # zero total weight means t = 0.5; default weights are equal
    zero = merge_tensors("nuslerp", [a, b], model_params=[{"weight": 1.0}, {"weight": -1.0}])
    assert torch.equal(zero, merge_tensors("nuslerp", [a, b]))
    # with a base, nuslerp is slerp of the task vectors around the base
    with_base = merge_tensors("nuslerp", [a, b], base=base)
    around = merge_tensors("nuslerp", [a - base, b - base]) + base
    _close(with_base, around.double(), rtol=1e-6)
    # row-wise interpolation keeps every row on its own great circle: per-row norms of orthogonal unit rows
    rows = torch.eye(4)
    other = torch.roll(torch.eye(4), 1, dims=1)
    per_row = merge_tensors("nuslerp", [rows, other], params={"nuslerp_flatten": False})
    torch.testing.assert_close(per_row.norm(dim=-1), torch.ones(4))
    # colinear rows interpolate linearly
    v = torch.randn(3, 8, generator=_gen(7))
    out = merge_tensors("nuslerp", [v, 3 * v], params={"nuslerp_flatten": False})
    torch.testing.assert_close(out, 2 * v)


def test_nuslerp_needs_two_models():
    x = torch.randn(3, 3)
    with pytest.raises(MergeInputError):
        merge_tensors("nuslerp", [x, x, x])


# ------------------------------------------------------------------ multislerp


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_matches_reference(shape, with_base):
    base, models = _finetunes(shape, 3, seed=8, spread=1.0)
    weights = [0.5, 0.3, 0.9]
    got = merge_tensors(
        "multislerp", models, base=base if with_base else None, model_params=[{"weight": w} for w in weights]
    )
    _close(got, ref_multislerp(models, weights, base=base if with_base else None))


def test_multislerp_unnormalized_weights_match_reference():
    models = _random((9, 5), 2, seed=9)
    got = merge_tensors(
        "multislerp", models, params={"normalize_weights": False}, model_params=[{"weight": 0.2}, {"weight": 0.5}]
    )
    _close(got, ref_multislerp(models, [0.2, 0.5], normalize=False))


def test_multislerp_properties():
    base, models = _finetunes((7, 6), 3, seed=10, spread=1.0)
    # one model: that model, whatever the base
    assert torch.equal(merge_tensors("multislerp", models[:1], base=base), models[0])
    # identical models: that model
    _close(merge_tensors("multislerp", [models[0]] * 3), models[0].double())
    # the result's norm is the weighted mean of the norms (no base)
    out = merge_tensors("multislerp", models, model_params=[{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}])
    mean_norm = (models[0].norm() + 2 * models[1].norm() + models[2].norm()) / 4
    torch.testing.assert_close(out.norm(), mean_norm)
    # two antipodal inputs with equal weights: linear fallback (their weighted sum)
    v = torch.randn(12, generator=_gen(11))
    torch.testing.assert_close(merge_tensors("multislerp", [v, -v]), torch.zeros(12))
    # more than two balancing out: an error saying what to change
    with pytest.raises(MergeInputError, match="weights"):
        merge_tensors("multislerp", [v, -v, v, -v])


# ------------------------------------------------------------------ karcher


@pytest.mark.parametrize("shape", SHAPES)
def test_karcher_matches_reference(shape):
    models = _random(shape, 3, seed=12)
    _close(merge_tensors("karcher", models), ref_karcher(models))


@pytest.mark.parametrize("params", [{"max_iter": 1}, {"max_iter": 3, "tol": 1e-3}, {"tol": 1e-9}])
def test_karcher_parameters_match_reference(params):
    _, models = _finetunes((15, 8), 4, seed=13, spread=2.0)
    _close(merge_tensors("karcher", models, params=params), ref_karcher(models, **params))


def test_karcher_properties():
    models = _random((10, 6), 3, seed=14)
    # identical models (and a single model) give that model
    _close(merge_tensors("karcher", [models[0]] * 3), models[0].double())
    assert torch.equal(merge_tensors("karcher", models[:1]), models[0])
    # symmetric in its inputs
    _close(merge_tensors("karcher", models[::-1]), merge_tensors("karcher", models).double())
    # two models: the geodesic midpoint, scaled to the mean norm
    a, b = models[:2]
    mid = merge_tensors("slerp", [b / b.norm()], base=a / a.norm(), params={"t": 0.5})
    _close(merge_tensors("karcher", [a, b]), (mid * (a.norm() + b.norm()) / 2).double(), rtol=1e-5)
    # positive rescaling of an input changes only the final norm
    scaled = merge_tensors("karcher", [a, 4 * b])
    plain = merge_tensors("karcher", [a, b])
    torch.testing.assert_close(scaled / scaled.norm(), plain / plain.norm())
    # all-zero inputs: zeros; a zero input counts in the norm but not in the direction
    assert torch.equal(merge_tensors("karcher", [torch.zeros(5)] * 2), torch.zeros(5))
    with_zero = merge_tensors("karcher", [a, torch.zeros_like(a)])
    _close(with_zero, (a / 2).double())


# ------------------------------------------------------------------ model_stock


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("k", [2, 3])
def test_model_stock_matches_reference(shape, filter_wise, k):
    base, models = _finetunes(shape, k, seed=15)
    got = merge_tensors("model_stock", models, base=base, params={"filter_wise": filter_wise})
    _close(got, ref_model_stock(base, models, filter_wise))


def test_model_stock_properties():
    base, (ft,) = _finetunes((6, 5), 1, seed=16)
    # identical fine-tunes: cos = 1, t = 1, the fine-tune itself
    _close(merge_tensors("model_stock", [ft, ft, ft], base=base), ft.double())
    _close(merge_tensors("model_stock", [ft, ft], base=base, params={"filter_wise": True}), ft.double())
    # orthogonal offsets: cos = 0, t = 0, the base
    e = torch.eye(6)[:, :5]
    out = merge_tensors("model_stock", [base + e[0], base + e[1]], base=base.clone())
    _close(out, base.double())
    # opposite offsets with two models: 1 + cos = 0 is singular, keep the base
    d = torch.randn(6, 5, generator=_gen(17))
    assert torch.equal(merge_tensors("model_stock", [base + d, base - d], base=base), base)
    # filter-wise: each row gets its own ratio (row 0 identical fine-tunes, row 1 orthogonal offsets)
    b2 = torch.zeros(2, 4)
    m1 = torch.tensor([[1.0, 2, 3, 4], [1, 0, 0, 0]])
    m2 = torch.tensor([[1.0, 2, 3, 4], [0, 1, 0, 0]])
    fw = merge_tensors("model_stock", [m1, m2], base=b2, params={"filter_wise": True})
    torch.testing.assert_close(fw, torch.tensor([[1.0, 2, 3, 4], [0, 0, 0, 0]]))
    with pytest.raises(MergeInputError):
        merge_tensors("model_stock", [ft], base=base)


# ------------------------------------------------------------------ chunking and threads

CHUNK_CASES = [
    ("slerp", {"t": 0.4}, "base", 1),
    ("nuslerp", {"nuslerp_flatten": True}, "base", 2),
    ("nuslerp", {"nuslerp_flatten": False}, "none", 2),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "base", 2),
    ("multislerp", {}, "base", 3),
    ("multislerp", {}, "none", 3),
    ("karcher", {}, "none", 3),
    ("model_stock", {"filter_wise": False}, "base", 3),
    ("model_stock", {"filter_wise": True}, "base", 3),
]


def _run(method, params, base_mode, k, shape, seed, **kwargs):
    base, models = _finetunes(shape, k, seed=seed)
    return merge_tensors(
        method,
        models,
        base=base if base_mode == "base" else None,
        params=params,
        model_params=[{"weight": 0.3 + i} for i in range(k)] if method in ("nuslerp", "multislerp") else None,
        **kwargs,
    )


@pytest.mark.parametrize(("method", "params", "base_mode", "k"), CHUNK_CASES)
def test_chunked_equals_whole_bit_for_bit(monkeypatch, method, params, base_mode, k):
    monkeypatch.setattr(determinism, "BLOCK_ELEMENTS", 96)  # many blocks on small tensors
    for shape in [(203,), (41, 7), (13, 4, 5), (3, 100), (3, 2500)]:
        whole = _run(method, params, base_mode, k, shape, seed=18)
        for chunk_rows in (1, 2, 5, 17, 1000):
            chunked = _run(method, params, base_mode, k, shape, seed=18, chunk_rows=chunk_rows)
            assert torch.equal(whole, chunked), (method, params, shape, chunk_rows)


def _reference(method, params, base, models):
    weights = [0.3 + i for i in range(len(models))]
    if method == "slerp":
        return ref_slerp(params["t"], base, models[0])
    if method == "nuslerp":
        flatten, row_wise = params["nuslerp_flatten"], params.get("nuslerp_row_wise", False)
        return ref_nuslerp(weights, *models, base=base, row_wise=row_wise, flatten=flatten)
    if method == "multislerp":
        return ref_multislerp(models, weights, base=base)
    if method == "karcher":
        return ref_karcher(models)
    return ref_model_stock(base, models, params["filter_wise"])


BIG_CASES = [
    ("slerp", {"t": 0.4}, "base", 1),
    ("nuslerp", {"nuslerp_flatten": False}, "none", 2),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "base", 2),
    ("multislerp", {}, "base", 2),
    ("karcher", {}, "none", 2),
    ("model_stock", {"filter_wise": True}, "base", 2),
]


@pytest.mark.parametrize(("method", "params", "base_mode", "k"), BIG_CASES)
def test_big_tensor_reference_chunks_and_threads(method, params, base_mode, k):
    """A tensor of more than one block (2**20 elements): reference, chunked and single-thread runs agree."""
    base, models = _finetunes(BIG, k, seed=19)
    whole = _run(method, params, base_mode, k, BIG, seed=19)
    _close(whole, _reference(method, params, base if base_mode == "base" else None, models))
    assert torch.equal(whole, _run(method, params, base_mode, k, BIG, seed=19, chunk_rows=1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _run(method, params, base_mode, k, BIG, seed=19)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, single)
