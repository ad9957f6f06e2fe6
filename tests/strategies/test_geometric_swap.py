"""nearswap, passthrough, arcee_fusion: references, properties, chunk invariance.

References are written from mergekit 0.1.5's definitions as plain whole-tensor
code (element loops where the tensor is small).
"""

from __future__ import annotations

import pytest
import torch

import convergent.strategies.arcee_fusion as arcee_module
from convergent import determinism
from convergent.errors import MergeInputError
from convergent.strategies import merge_tensors

SHAPES = [(40,), (9, 11), (4, 3, 7)]
BIG = (2100, 512)  # > 2**20 elements: two blocks


def _pair(shape, seed: int, spread: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen) * 0.1
    return base, base + spread * torch.randn(shape, generator=gen)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-6) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = float((got.double() - want.double()).abs().max())
    assert err <= rtol * max(float(want.abs().max()), 1e-30), err


# ------------------------------------------------------------------ nearswap


def ref_nearswap(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = []
    for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist()):
        w = min(1.0, max(0.0, t / max(abs(x - y), 1e-6)))
        out.append(w * y + (1 - w) * x)
    return torch.tensor(out, dtype=torch.float64).reshape(a.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 1e-3, 0.02, 0.1, 5.0])
def test_nearswap_matches_reference(shape, t):
    base, other = _pair(shape, seed=1)
    _close(merge_tensors("nearswap", [other], base=base, params={"t": t}), ref_nearswap(t, base, other))


def test_nearswap_limits_and_elementwise_rule():
    base, other = _pair((6, 8), seed=2)
    assert torch.equal(merge_tensors("nearswap", [other], base=base, params={"t": 0.0}), base)
    assert torch.equal(merge_tensors("nearswap", [other], base=base, params={"t": 1e9}), other)
    a = torch.tensor([0.0, 0.0, 0.0, 1.0])
    b = torch.tensor([0.05, 1.0, -4.0, 1.0])
    # within t of the base: swapped in; farther: pulled towards it by t / |difference|
    out = merge_tensors("nearswap", [b], base=a, params={"t": 0.5})
    torch.testing.assert_close(out, torch.tensor([0.05, 0.5, -0.5, 1.0]))
    with pytest.raises(MergeInputError):
        merge_tensors("nearswap", [b], params={"t": 0.5})


# ------------------------------------------------------------------ passthrough


def test_passthrough_copies_and_scales():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    out = merge_tensors("passthrough", [x])
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    scaled = merge_tensors("passthrough", [x], model_params=[{"scale": -0.25}])
    assert torch.equal(scaled, x * -0.25)
    scalar = merge_tensors("passthrough", [torch.tensor(2.0)], model_params=[{"scale": 3.0}])
    assert torch.equal(scalar, torch.tensor(6.0))
    with pytest.raises(MergeInputError, match="exactly one"):
        merge_tensors("passthrough", [x, x])


# ------------------------------------------------------------------ arcee_fusion


def ref_arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """Importance |model - base| x KL(softmax(model) || softmax(base)) along the last dim; keep outliers."""
    p = torch.softmax(model.double(), dim=-1) + 1e-8
    q = torch.softmax(base.double(), dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True).to(torch.float32)
    importance = (model - base).abs() * kl
    ordered = torch.sort(importance.reshape(-1)).values
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[idx]
    threshold = median + 1.5 * (q3 - q1)
    return base + (model - base) * (importance >= threshold).to(torch.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spread", [0.05, 1.0])
def test_arcee_fusion_matches_reference(shape, spread):
    base, model = _pair(shape, seed=4, spread=spread)
    got = merge_tensors("arcee_fusion", [model], base=base)
    assert torch.equal(got, ref_arcee_fusion(base, model))


def test_arcee_fusion_properties():
    base, model = _pair((10, 30), seed=5, spread=0.01)
    # identical inputs: the base
    assert torch.equal(merge_tensors("arcee_fusion", [base.clone()], base=base), base)
    out = merge_tensors("arcee_fusion", [model], base=base)
    # every element is either the base's or the model's (as base + delta), and only the outliers change
    from_model = out == base + (model - base)
    assert bool(((out == base) | from_model).all())
    assert 0 < int((from_model & (model != base)).sum()) < base.numel() // 4
    # one large change in an otherwise quiet row is an outlier and is kept
    spiked = model.clone()
    spiked[3, 7] += 2.0
    out = merge_tensors("arcee_fusion", [spiked], base=base)
    assert out[3, 7] == base[3, 7] + (spiked[3, 7] - base[3, 7])
    with pytest.raises(MergeInputError):
        merge_tensors("arcee_fusion", [model, model], base=base)


@pytest.mark.parametrize("shape", [(300,), (30, 17)])
def test_arcee_fusion_streaming_quartiles_equal_sorted(monkeypatch, shape):
    base, model = _pair(shape, seed=8)
    in_memory = merge_tensors("arcee_fusion", [model], base=base)
    monkeypatch.setattr(arcee_module, "IN_MEMORY_QUANTILES", 0)
    monkeypatch.setattr(determinism, "BLOCK_ELEMENTS", 64)
    assert torch.equal(in_memory, merge_tensors("arcee_fusion", [model], base=base))
    assert torch.equal(in_memory, merge_tensors("arcee_fusion", [model], base=base, chunk_rows=3))


# ------------------------------------------------------------------ chunking, big tensors, threads

CASES = [
    ("nearswap", {"t": 0.03}, None),
    ("passthrough", {}, [{"scale": 1.5}]),
    ("arcee_fusion", {}, None),
]


def _run(method, params, model_params, shape, seed, **kwargs):
    base, model = _pair(shape, seed=seed)
    if method == "passthrough":
        return merge_tensors(method, [model], model_params=model_params, **kwargs)
    return merge_tensors(method, [model], base=base, params=params, **kwargs)


@pytest.mark.parametrize(("method", "params", "model_params"), CASES)
def test_chunked_equals_whole_bit_for_bit(monkeypatch, method, params, model_params):
    monkeypatch.setattr(determinism, "BLOCK_ELEMENTS", 96)
    for shape in [(203,), (41, 7), (13, 4, 5), (3, 100)]:
        whole = _run(method, params, model_params, shape, seed=6)
        for chunk_rows in (1, 2, 5, 17, 1000):
            assert torch.equal(whole, _run(method, params, model_params, shape, seed=6, chunk_rows=chunk_rows))


@pytest.mark.parametrize(("method", "params", "model_params"), CASES)
def test_big_tensor_reference_chunks_and_threads(method, params, model_params):
    base, model = _pair(BIG, seed=7)
    whole = _run(method, params, model_params, BIG, seed=7)
    if method == "nearswap":
        _close(whole, ref_nearswap_vector(params["t"], base, model))
    elif method == "passthrough":
        assert torch.equal(whole, model * 1.5)
    else:
        assert torch.equal(whole, ref_arcee_fusion(base, model))
    assert torch.equal(whole, _run(method, params, model_params, BIG, seed=7, chunk_rows=1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(whole, _run(method, params, model_params, BIG, seed=7))
    finally:
        torch.set_num_threads(threads)


def ref_nearswap_vector(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``ref_nearswap`` written with tensor ops, for tensors too big for element loops."""
    a, b = a.double(), b.double()
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a
