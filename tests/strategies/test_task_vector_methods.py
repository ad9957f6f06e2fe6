"""Task-vector methods (EMR, PCB, CABS, LiNeS, TSV, Iso-C/CTS, STAR, KnOTS).

Each method is checked against a plain reference written here from the paper's
definition, plus the properties that pin down its behaviour; the streaming ones
must give the same bytes whole and in chunks.
"""

from __future__ import annotations

import math

import pytest
import torch

from convergent import determinism
from convergent.errors import MergeInputError
from convergent.strategies import merge_tensors, task_vector_masks


def _inputs(n: int, shape: tuple[int, ...], seed: int, spread: float = 0.1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base, [base + spread * torch.randn(shape, generator=gen) for _ in range(n)]


def _tvs(base: torch.Tensor, models: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(m.to(torch.float64) - base.to(torch.float64)) for m in models]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected.to(torch.float32), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- EMR


def _emr_reference(base, models, task=None, lam=1.0):
    tvs = torch.stack([m - base for m in models])
    total = torch.zeros_like(base)
    for t in tvs:
        total += t
    gamma = torch.where(total > 0, 1.0, -1.0)  # zero sum counts as negative
    masks = tvs * gamma > 0
    uni = gamma * (tvs.abs() * masks).amax(0)
    if task is None:
        return base + lam * uni
    rescaler = tvs[task].abs().sum() / (masks[task] * uni).abs().sum()
    return base + lam * rescaler * masks[task] * uni


def test_emr_matches_elect_mask_rescale() -> None:
    base, models = _inputs(4, (9, 7), seed=1)
    _close(merge_tensors("emr", models, base=base), _emr_reference(base, models))
    _close(merge_tensors("emr", models, base=base, params={"lambda": 0.6}), _emr_reference(base, models, lam=0.6))
    for t in range(4):
        out = merge_tensors("emr", models, base=base, params={"task": t, "lambda": 0.9})
        _close(out, _emr_reference(base, models, task=t, lam=0.9))


def test_emr_unified_vector_keeps_agreeing_max_magnitude() -> None:
    base = torch.zeros(3)
    models = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -0.25]), torch.tensor([-4.0, -1.0, 0.5])]
    # sums: 0 (-> negative), -2, 0.75; the largest magnitude among models agreeing with each sign.
    assert torch.equal(merge_tensors("emr", models, base=base), torch.tensor([-4.0, -2.0, 0.5]))
    with pytest.raises(MergeInputError, match="task=3"):
        merge_tensors("emr", models, base=base, params={"task": 3})


# --------------------------------------------------------------------------- PCB


def _pcb_reference(base, models, ratio, lam=1.0):
    tvs = torch.stack([(m - base).reshape(-1) for m in models])
    n, d = tvs.shape
    magnitude = tvs.abs()
    ordered = torch.sort(magnitude, dim=1).values
    lo = ordered[:, int(d * 0.0001)][:, None]
    hi = ordered[:, int(d * (1 - 0.0001)) - 1][:, None]
    clamped_abs = torch.minimum(torch.maximum(magnitude, lo), hi)
    clamped = torch.sign(tvs) * clamped_abs
    intra = torch.exp(n * ((clamped_abs - lo) / (hi - lo)) ** 2)
    total = torch.zeros(d)
    for t in tvs:
        total += t
    inter = torch.tanh(tvs * total)
    score = intra * inter
    ordered_score = torch.sort(score, dim=1).values
    q = ordered_score[:, int(d * (1 - ratio))][:, None]
    top = ordered_score[:, -1][:, None]
    scale = (torch.minimum(torch.maximum(score, q), top) - q) / (top - q)
    num = torch.zeros(d)
    den = torch.zeros(d)
    for c, s in zip(clamped, scale):
        num += c * s
        den += s
    return base + lam * (num / den.clamp(min=1e-12)).reshape(base.shape)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_pcb_matches_reference(ratio: float) -> None:
    base, models = _inputs(3, (40, 30), seed=2)
    out = merge_tensors("pcb", models, base=base, params={"ratio": ratio, "lambda": 1.2})
    _close(out, _pcb_reference(base, models, ratio, lam=1.2))


def test_pcb_drops_all_but_the_top_ratio_per_task() -> None:
    base, models = _inputs(2, (50, 20), seed=3)
    out = merge_tensors("pcb", models, base=base, params={"ratio": 0.05})
    changed = (out != base).float().mean().item()
    assert 0.0 < changed <= 2 * 0.05  # at most the union of two 5 % selections


# --------------------------------------------------------------------------- CABS


def _cabs_nm_reference(base, models, n, m, weights):
    flat = [(mod - base).reshape(-1).tolist() for mod in models]
    size = len(flat[0])
    used = [False] * size
    merged = [0.0] * size
    for tv, w in zip(flat, weights):
        for start in range(0, size, m):
            free = [j for j in range(start, min(size, start + m)) if not used[j]]
            count = n if start + m <= size else math.ceil(n * (size - start) / m)
            for j in sorted(free, key=lambda j: (-abs(tv[j]), j))[:count]:
                used[j] = True
                merged[j] += w * tv[j]
    return base + torch.tensor(merged).reshape(base.shape)


def _cabs_magnitude_reference(base, models, density, weights):
    flat = [(mod - base).reshape(-1).tolist() for mod in models]
    size = len(flat[0])
    k = max(1, round(density * size))
    used = [False] * size
    merged = [0.0] * size
    for tv, w in zip(flat, weights):
        free = [abs(tv[j]) for j in range(size) if not used[j]]
        threshold = sorted(free, reverse=True)[k - 1] if k <= len(free) else -1.0
        keep = [j for j in range(size) if not used[j] and abs(tv[j]) >= threshold]
        for j in keep:
            used[j] = True
            merged[j] += w * tv[j]
    return base + torch.tensor(merged).reshape(base.shape)


def test_cabs_nm_matches_sequential_reference() -> None:
    base, models = _inputs(3, (6, 8), seed=4)
    weights = [1.0, 0.5, 2.0]
    out = merge_tensors(
        "cabs", models, base=base, params={"n": 2, "m": 4}, model_params=[{"weight": w} for w in weights]
    )
    _close(out, _cabs_nm_reference(base, models, 2, 4, weights))
    # A partial last group (10 = 2 x 4 + 2) keeps ceil(n * 2 / 4).
    base1, models1 = _inputs(2, (10,), seed=5)
    out1 = merge_tensors("cabs", models1, base=base1, params={"n": 3, "m": 4})
    _close(out1, _cabs_nm_reference(base1, models1, 3, 4, [1.0, 1.0]))


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_cabs_magnitude_matches_sequential_reference(density: float) -> None:
    base, models = _inputs(3, (7, 9), seed=6)
    out = merge_tensors("cabs", models, base=base, params={"density": density, "lambda": 0.8})
    expected = _cabs_magnitude_reference(base, models, density, [1.0, 1.0, 1.0])
    _close(out, base + 0.8 * (expected - base))


def test_cabs_kept_sets_do_not_overlap() -> None:
    base = torch.zeros(4, 4)
    models = [torch.full((4, 4), 1.0), torch.full((4, 4), 2.0)]
    out = merge_tensors("cabs", models, base=base, params={"n": 2, "m": 4})
    # 2:4 each, conflict-aware: the second task takes the two slots the first left free.
    assert sorted(out.reshape(-1).tolist()) == [1.0] * 8 + [2.0] * 8
    with pytest.raises(MergeInputError, match="n:m"):
        merge_tensors("cabs", models, base=base, params={"n": 3})


# --------------------------------------------------------------------------- LiNeS


def test_lines_scales_task_arithmetic_by_depth() -> None:
    base, models = _inputs(3, (5, 4), seed=7)
    weights = [1.0, 0.5, 2.0]
    mps = [{"weight": w} for w in weights]
    tv_sum = sum(w * t for w, t in zip(weights, _tvs(base, models)))
    for layer in range(6):
        out = merge_tensors(
            "lines", models, base=base, params={"alpha": 0.3, "beta": 0.8}, model_params=mps, layer=layer, num_layers=6
        )
        _close(out, base + (0.3 + 0.8 * layer / 5) * tv_sum)
    # Not in a numbered layer: alpha. alpha omitted: 1 / number of models.
    _close(merge_tensors("lines", models, base=base, params={"alpha": 0.3, "beta": 0.8}, model_params=mps),
           base + 0.3 * tv_sum)  # fmt: skip
    _close(merge_tensors("lines", models, base=base, model_params=mps, layer=0, num_layers=6), base + tv_sum / 3)


def test_lines_without_depth_term_is_scaled_task_arithmetic() -> None:
    base, models = _inputs(2, (6, 3), seed=8)
    tv_sum = sum(_tvs(base, models))
    for layer in (0, 3, 7):
        out = merge_tensors("lines", models, base=base, params={"alpha": 0.4, "beta": 0.0}, layer=layer, num_layers=8)
        _close(out, base + 0.4 * tv_sum)
    # alpha = beta: the deepest layer gets twice the shallowest layer's scaling.
    deepest = merge_tensors("lines", models, base=base, params={"alpha": 0.4, "beta": 0.4}, layer=7, num_layers=8)
    _close(deepest, base + 0.8 * tv_sum)


# --------------------------------------------------------------------------- SVD methods: references


def _svd(mat):
    return torch.linalg.svd(mat, full_matrices=False)


def _orthogonal(mat):
    u, _, vh = _svd(mat)
    return u @ vh


def _tsv_reference(base, models, lam=1.0):
    tvs = _tvs(base, models)
    r = min(tvs[0].shape)
    k = r // len(tvs)
    sum_u = torch.zeros(tvs[0].shape[0], r, dtype=torch.float64)
    sum_s = torch.zeros(r, dtype=torch.float64)
    sum_v = torch.zeros(r, tvs[0].shape[1], dtype=torch.float64)
    for i, tv in enumerate(tvs):
        u, s, vh = _svd(tv)
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_v[i * k : (i + 1) * k] = vh[:k]
    return base + lam * (_orthogonal(sum_u) @ torch.diag(sum_s) @ _orthogonal(sum_v))


def _iso_c_reference(base, models, lam=1.0):
    u, s, vh = _svd(sum(_tvs(base, models)))
    return base + lam * (u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh)


def _iso_cts_reference(base, models, fraction, lam=1.0):
    tvs = _tvs(base, models)
    t = len(tvs)
    r = min(tvs[0].shape)
    per_task = round((r - int(r * fraction)) / t)
    common = r - per_task * t
    u, s, vh = _svd(sum(tvs))
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common]]
    for tv in tvs:
        residual = tv - u[:, :common] @ u[:, :common].T @ tv
        ut, st, vt = _svd(residual)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vt[:per_task])
    mean_s = float(torch.cat(ss).mean())
    return base + lam * mean_s * (_orthogonal(torch.cat(us, 1)) @ _orthogonal(torch.cat(vs, 0)))


def _star_reference(base, models, eta, lam=1.0):
    out = []
    for tv in _tvs(base, models):
        u, s, vh = _svd(tv)
        total = float(s.sum())
        running, keep = 0.0, 0
        for value in s.tolist():  # fewest top values reaching eta % of the nuclear norm
            running += value
            keep += 1
            if running >= total * eta / 100:
                break
        kept = s[:keep] * (total / float(s[:keep].sum()))
        out.append(u[:, :keep] @ torch.diag(kept) @ vh[:keep])
    return base + lam * sum(out) / len(out)


def _ties_reference(values, density):
    trimmed = []
    for v in values:
        k = max(1, round(density * v.numel()))
        threshold = torch.sort(v.abs().reshape(-1), descending=True).values[k - 1]
        trimmed.append(torch.where(v.abs() >= threshold, v, 0.0))
    sign = torch.sign(sum(trimmed))
    agree = [(torch.sign(t) == sign) & (t != 0) for t in trimmed]
    return sum(torch.where(a, t, 0.0) for a, t in zip(agree, trimmed)) / sum(a.double() for a in agree).clamp(min=1)


def _knots_reference(base, models, merge, density=0.2, lam=1.0):
    tvs = _tvs(base, models)
    d_in = tvs[0].shape[1]
    u, s, vh = _svd(torch.cat(tvs, dim=1))
    reps = [torch.diag(s) @ vh[:, i * d_in : (i + 1) * d_in] for i in range(len(tvs))]
    merged = sum(reps) if merge == "linear" else _ties_reference(reps, density)
    return base + lam * (u @ merged)


# --------------------------------------------------------------------------- SVD methods: tests


def test_tsv_matches_reference_and_is_exact_for_one_model() -> None:
    base, models = _inputs(3, (12, 9), seed=9)
    _close(merge_tensors("tsv", models, base=base, params={"lambda": 0.7}), _tsv_reference(base, models, lam=0.7))
    # One task keeps its full spectrum: TSV returns its own task vector.
    _close(merge_tensors("tsv", models[:1], base=base), models[0])


def test_iso_c_matches_reference_and_flattens_the_spectrum() -> None:
    base, models = _inputs(3, (10, 14), seed=10)
    out = merge_tensors("iso_c", models, base=base, params={"lambda": 1.3})
    _close(out, _iso_c_reference(base, models, lam=1.3))
    s = torch.linalg.svdvals((out.double() - base.double()) / 1.3)
    assert float(s.max() - s.min()) < 1e-4 * float(s.mean())


def test_iso_cts_matches_reference_and_reduces_to_iso_c() -> None:
    base, models = _inputs(3, (16, 12), seed=11)
    out = merge_tensors("iso_cts", models, base=base, params={"common_space_fraction": 0.5})
    _close(out, _iso_cts_reference(base, models, 0.5))
    whole_common = merge_tensors("iso_cts", models, base=base, params={"common_space_fraction": 1.0})
    _close(whole_common, merge_tensors("iso_c", models, base=base))


@pytest.mark.parametrize("eta", [10.0, 40.0, 75.0])
def test_star_matches_reference(eta: float) -> None:
    base, models = _inputs(3, (11, 8), seed=12)
    out = merge_tensors("star", models, base=base, params={"eta": eta, "lambda": 0.9})
    _close(out, _star_reference(base, models, eta, lam=0.9))


def test_star_keeping_the_whole_spectrum_is_the_average() -> None:
    base, models = _inputs(3, (11, 8), seed=13)
    _close(merge_tensors("star", models, base=base, params={"eta": 100.0}), base + sum(_tvs(base, models)) / 3)


@pytest.mark.parametrize("density", [0.2, 0.6])
def test_knots_ties_matches_reference(density: float) -> None:
    base, models = _inputs(3, (9, 5), seed=14)
    out = merge_tensors("knots", models, base=base, params={"merge": "ties", "density": density, "lambda": 0.6})
    _close(out, _knots_reference(base, models, "ties", density=density, lam=0.6))


def test_knots_linear_is_task_arithmetic() -> None:
    base, models = _inputs(3, (9, 5), seed=15)
    out = merge_tensors("knots", models, base=base, params={"merge": "linear", "lambda": 0.5})
    _close(out, _knots_reference(base, models, "linear", lam=0.5))
    _close(out, base + 0.5 * sum(_tvs(base, models)))


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "star"])
@pytest.mark.parametrize("shape", [(13,), ()])
def test_svd_methods_fall_back_to_mean_task_arithmetic_on_vectors(method: str, shape: tuple[int, ...]) -> None:
    base, models = _inputs(3, shape, seed=16)
    out = merge_tensors(method, models, base=base, params={"lambda": 0.8})
    _close(out, base + 0.8 * sum(_tvs(base, models)) / 3)


def test_knots_falls_back_to_its_inner_merge_on_vectors() -> None:
    base, models = _inputs(3, (13,), seed=17)
    tvs = _tvs(base, models)
    linear = merge_tensors("knots", models, base=base, params={"merge": "linear"})
    _close(linear, base + sum(tvs))
    ties = merge_tensors("knots", models, base=base, params={"merge": "ties", "density": 0.5})
    _close(ties, base + _ties_reference(tvs, 0.5))


def test_svd_methods_treat_conv_kernels_as_matrices() -> None:
    base, models = _inputs(3, (6, 2, 3, 3), seed=18)
    flat_base = base.reshape(6, -1)
    flat_models = [m.reshape(6, -1) for m in models]
    for method in ("tsv", "iso_c", "iso_cts", "star", "knots"):
        out = merge_tensors(method, models, base=base)
        assert _same_bytes(out, merge_tensors(method, flat_models, base=flat_base).reshape(base.shape))


# --------------------------------------------------------------------------- streaming and determinism

_STREAMING = [
    ("emr", {}, None),
    ("emr", {"task": 2, "lambda": 0.7}, None),
    ("pcb", {"ratio": 0.3}, None),
    ("cabs", {"density": 0.3}, [{"weight": w} for w in (1.0, 0.5, 2.0)]),
    ("cabs", {"n": 2, "m": 4}, None),
    ("lines", {"alpha": 0.3, "beta": 0.6}, [{"weight": w} for w in (1.0, 0.5, 2.0)]),
]


@pytest.mark.parametrize(("method", "params", "model_params"), _STREAMING)
@pytest.mark.parametrize("shape", [(29, 7), (150,)])
def test_chunked_equals_whole_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, method: str, params: dict, model_params: list | None, shape: tuple[int, ...]
) -> None:
    monkeypatch.setattr(determinism, "BLOCK_ELEMENTS", 64)  # several blocks on a small tensor
    base, models = _inputs(3, shape, seed=19)
    kwargs = {"base": base, "params": params, "model_params": model_params, "layer": 1, "num_layers": 4}
    whole = merge_tensors(method, models, **kwargs)
    for chunk_rows in (1, 20):
        assert _same_bytes(whole, merge_tensors(method, models, chunk_rows=chunk_rows, **kwargs)), chunk_rows


@pytest.mark.parametrize(("method", "params"), [("pcb", {"ratio": 0.3}), ("cabs", {"density": 0.3})])
def test_streamed_thresholds_equal_in_memory_ones(monkeypatch: pytest.MonkeyPatch, method: str, params: dict) -> None:
    monkeypatch.setattr(determinism, "BLOCK_ELEMENTS", 64)
    base, models = _inputs(3, (29, 7), seed=21)
    in_memory = merge_tensors(method, models, base=base, params=params)
    monkeypatch.setattr(task_vector_masks, "IN_MEMORY_SELECT", 0)  # force reduce's two-pass streaming select
    assert _same_bytes(in_memory, merge_tensors(method, models, base=base, params=params))
    assert _same_bytes(in_memory, merge_tensors(method, models, base=base, params=params, chunk_rows=10))


_ALL = [
    *[(m, p) for m, p, _ in _STREAMING],
    ("tsv", {}),
    ("iso_c", {}),
    ("iso_cts", {}),
    ("star", {}),
    ("knots", {}),
    ("knots", {"merge": "linear"}),
]


@pytest.mark.parametrize(("method", "params"), _ALL)
def test_same_seed_gives_identical_bytes(method: str, params: dict) -> None:
    for shape in [(8, 6), (9,), ()]:
        base, models = _inputs(3, shape, seed=20)
        first = merge_tensors(method, models, base=base, params=params, seed=7, name="w")
        second = merge_tensors(method, models, base=base, params=params, seed=7, name="w")
        assert first.shape == shape and first.dtype == torch.float32
        assert _same_bytes(first, second)
