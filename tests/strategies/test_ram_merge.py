"""ram and ramplus_tl (Reinforced Agent Merging): references, properties, chunk invariance.

The references follow the paper's description (Yuan et al. 2026, arXiv:2601.13572)
as implemented by mergekit 0.1.5: element loops over sparse task vectors.
"""

from __future__ import annotations

import pytest
import torch

from convergent import determinism
from convergent.strategies import merge_tensors

SHAPES = [(50,), (8, 9), (3, 4, 5)]
BIG = (2100, 512)  # > 2**20 elements: two blocks


def _sparse(shape, k: int, seed: int, density: float = 0.4):
    """A base and k fine-tunes each changing a random subset of the elements (RL-like sparse updates)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    models = []
    for _ in range(k):
        keep = torch.rand(shape, generator=gen) < density
        models.append(base + torch.randn(shape, generator=gen) * 0.1 * keep)
    return base, models


def ref_ram(base, models, epsilon=1e-5, r=None, alpha=None) -> torch.Tensor:
    """Per element: average the task vectors of the models that changed it, keep a unique change whole.

    With ``r``/``alpha`` (RAM+), model i's unique changes are scaled by
    1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha), counted over the tensor.
    """
    b = base.reshape(-1).tolist()
    tvs = [[x - y for x, y in zip(m.reshape(-1).tolist(), b)] for m in models]
    changed = [[abs(v) > epsilon for v in tv] for tv in tvs]
    n = len(b)
    counts = [sum(c[j] for c in changed) for j in range(n)]
    scales = [1.0] * len(models)
    if r is not None:
        for i, c in enumerate(changed):
            shared = sum(1 for j in range(n) if c[j] and counts[j] > 1)
            unique = sum(1 for j in range(n) if c[j] and counts[j] == 1)
            rho = shared / max(unique, epsilon)
            scales[i] = 1 + r * min(max(rho, 0.0), alpha)
    out = []
    for j in range(n):
        delta = 0.0
        for i, tv in enumerate(tvs):
            if changed[i][j]:
                delta += tv[j] * scales[i] if counts[j] == 1 else tv[j] / counts[j]
        out.append(b[j] + delta)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-6) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = float((got.double() - want.double()).abs().max())
    assert err <= rtol * max(float(want.abs().max()), 1e-30), err


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("epsilon", [1e-5, 0.05])
def test_ram_matches_reference(shape, k, epsilon):
    base, models = _sparse(shape, k, seed=1)
    got = merge_tensors("ram", models, base=base, params={"epsilon": epsilon})
    _close(got, ref_ram(base, models, epsilon))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("params", [{}, {"r": 0.5, "alpha": 0.9, "epsilon": 1e-3}, {"r": 2.0, "alpha": 10.0}])
def test_ramplus_tl_matches_reference(shape, k, params):
    base, models = _sparse(shape, k, seed=2)
    full = {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5, **params}
    got = merge_tensors("ramplus_tl", models, base=base, params=params)
    _close(got, ref_ram(base, models, full["epsilon"], full["r"], full["alpha"]))


def test_ram_properties():
    base = torch.zeros(6)
    a = torch.tensor([1.0, 0, 0, 2.0, 0, 0])
    b = torch.tensor([0.0, 3.0, 0, 4.0, 0, 0])
    # unique updates kept whole, shared ones averaged, untouched elements stay at the base
    torch.testing.assert_close(merge_tensors("ram", [a, b], base=base), torch.tensor([1.0, 3.0, 0, 3.0, 0, 0]))
    # identical fine-tunes: the fine-tune
    torch.testing.assert_close(merge_tensors("ram", [a, a, a], base=base), a)
    # changes below epsilon do not count: the base
    assert torch.equal(merge_tensors("ram", [a, b], base=base, params={"epsilon": 10.0}), base)
    # a base alone, with no other model, is the base
    assert torch.equal(merge_tensors("ram", [], base=base), base)
    assert torch.equal(merge_tensors("ramplus_tl", [], base=base), base)


def test_ramplus_tl_properties():
    base, models = _sparse((20, 10), 3, seed=3)
    # r = 0: no rescaling, exactly RAM
    assert torch.equal(
        merge_tensors("ramplus_tl", models, base=base, params={"r": 0.0}), merge_tensors("ram", models, base=base)
    )
    # unique updates are scaled by 1 + r * clamp(shared / unique, 0, alpha), per model
    base = torch.zeros(5)
    a = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])  # 1 shared, 2 unique: rho = 0.5 -> clamped to alpha
    b = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0])  # 1 shared, 1 unique: rho = 1
    out = merge_tensors("ramplus_tl", [a, b], base=base, params={"r": 0.5, "alpha": 0.8})
    torch.testing.assert_close(out, torch.tensor([1.0, 1.25, 1.25, 0.0, 2.0 * 1.4]))
    # a model with only shared updates (unique = 0) has rho = shared / epsilon, capped at alpha
    c = torch.tensor([1.0, 0, 0, 0, 0])
    out = merge_tensors("ramplus_tl", [c, c], base=base, params={"r": 1.0, "alpha": 0.3})
    torch.testing.assert_close(out, c)


CASES = [("ram", {}), ("ram", {"epsilon": 0.05}), ("ramplus_tl", {}), ("ramplus_tl", {"r": 0.7, "alpha": 2.0})]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_chunked_equals_whole_bit_for_bit(monkeypatch, method, params):
    monkeypatch.setattr(determinism, "BLOCK_ELEMENTS", 96)
    for shape in [(203,), (41, 7), (13, 4, 5)]:
        base, models = _sparse(shape, 3, seed=4)
        whole = merge_tensors(method, models, base=base, params=params)
        for chunk_rows in (1, 2, 5, 17, 1000):
            assert torch.equal(whole, merge_tensors(method, models, base=base, params=params, chunk_rows=chunk_rows))


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_big_tensor_reference_chunks_and_threads(method):
    base, models = _sparse(BIG, 2, seed=5)
    whole = merge_tensors(method, models, base=base)
    # vectorised form of ref_ram for a tensor too big for element loops
    tvs = torch.stack([m.double() - base.double() for m in models])
    changed = tvs.abs() > 1e-5
    counts = changed.sum(0)
    scales = torch.ones(2, dtype=torch.float64)
    if method == "ramplus_tl":
        shared = (changed & (counts > 1)).flatten(1).sum(1).double()
        unique = (changed & (counts == 1)).flatten(1).sum(1).double()
        scales = 1 + 0.1 * (shared / unique.clamp(min=1e-5)).clamp(0, 0.2)
    unique_part = (tvs * changed * scales.view(-1, 1, 1)).sum(0) * (counts == 1)
    shared_part = (tvs * changed).sum(0) / counts.clamp(min=1) * (counts > 1)
    _close(whole, base.double() + unique_part + shared_part)
    assert torch.equal(whole, merge_tensors(method, models, base=base, chunk_rows=1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(whole, merge_tensors(method, models, base=base))
    finally:
        torch.set_num_threads(threads)
