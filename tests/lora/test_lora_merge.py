"""LoRA merging: exactness of cat/svd, agreement of delta-space strategies, PEFT round trips, folding."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from convergent.lora import LoraAdapter, fold_adapter, merge_adapters
from convergent.strategies import merge_tensors
from tests.lora.conftest import LoraFamily, build_base, logits


def expected_sum(family: LoraFamily, names: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i dW_i per module over the union of modules (missing = zero), from PEFT's deltas."""
    out: dict[str, torch.Tensor] = {}
    for name, w in zip(names, weights):
        for module, delta in family.deltas[name].items():
            out[module] = out.get(module, torch.zeros_like(delta)) + w * delta
    return out


def read_deltas(path) -> dict[str, torch.Tensor]:
    with LoraAdapter(path) as adapter:
        return {m: adapter.delta(m) for m in adapter.modules}


def assert_deltas_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for module in want:
        torch.testing.assert_close(got[module], want[module], atol=atol, rtol=1e-4, msg=module)


def test_reader_matches_peft_deltas(lora_family: LoraFamily):
    """Scales from r/alpha, rsLoRA, rank/alpha patterns and embedding layout agree with PEFT."""
    for name in ("a1", "a2", "a3"):
        assert_deltas_close(read_deltas(lora_family.adapters[name]), lora_family.deltas[name])
    with LoraAdapter(lora_family.adapters["a2"]) as a2:
        assert a2.modules["model.layers.1.self_attn.q_proj"].rank == 2
        assert a2.modules["model.layers.0.self_attn.v_proj"].alpha == 3
        assert a2.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(16 / 8**0.5)
    with LoraAdapter(lora_family.adapters["a3"]) as a3:
        assert a3.modules["model.embed_tokens"].kind == "embedding"
        assert a3.modules["model.embed_tokens"].weight_shape == (128, 64)


def test_cat_is_exact_weighted_sum(lora_family: LoraFamily, tmp_path):
    names, weights = ["a1", "a2", "a3"], [0.5, 1.5, -0.7]
    out = tmp_path / "cat"
    result = merge_adapters([lora_family.adapters[n] for n in names], out, method="cat", weights=weights)
    assert_deltas_close(read_deltas(out), expected_sum(lora_family, names, weights))
    # rank = sum of the ranks of the adapters that adapt the module
    assert result.ranks["model.layers.0.self_attn.q_proj"] == 4 + 8 + 6
    assert result.ranks["model.layers.1.self_attn.q_proj"] == 4 + 2 + 6
    assert result.ranks["model.layers.0.self_attn.v_proj"] == 4 + 8
    assert result.ranks["model.embed_tokens"] == 6
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert not cfg["use_rslora"]
    assert cfg["target_modules"] == ["embed_tokens", "k_proj", "q_proj", "v_proj"]


def test_svd_full_rank_reproduces_the_sum(lora_family: LoraFamily, tmp_path):
    names, weights = ["a1", "a2", "a3"], [0.5, 1.5, -0.7]
    out = tmp_path / "svd"
    merge_adapters([lora_family.adapters[n] for n in names], out, method="svd", weights=weights)
    assert_deltas_close(read_deltas(out), expected_sum(lora_family, names, weights))


def test_svd_low_rank_is_best_approximation(lora_family: LoraFamily, tmp_path):
    names, weights, k = ["a1", "a2", "a3"], [1.0, 0.8, 0.6], 3
    out = tmp_path / "svd3"
    result = merge_adapters([lora_family.adapters[n] for n in names], out, method="svd", weights=weights, rank=k)
    assert set(result.ranks.values()) == {k}
    got = read_deltas(out)
    for module, full in expected_sum(lora_family, names, weights).items():
        u, s, vh = torch.linalg.svd(full.double(), full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        torch.testing.assert_close(got[module].double(), best, atol=1e-5, rtol=1e-4, msg=module)
        # Eckart-Young: the error is exactly the discarded spectrum
        err = torch.linalg.matrix_norm(got[module].double() - full.double())
        assert err.item() == pytest.approx(s[k:].square().sum().sqrt().item(), rel=1e-4, abs=1e-6)


def test_linear_single_adapter_weight_one_is_that_adapter(lora_family: LoraFamily, tmp_path):
    out = tmp_path / "one"
    result = merge_adapters([lora_family.adapters["a2"]], out, method="linear", weights=[1.0])
    assert_deltas_close(read_deltas(out), lora_family.deltas["a2"])
    assert result.ranks["model.layers.1.self_attn.q_proj"] == 2  # rank kept per module
    assert result.ranks["model.layers.0.self_attn.q_proj"] == 8


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "task_arithmetic", "linear"])
def test_delta_space_strategies_agree_with_direct_run(lora_family: LoraFamily, tmp_path, method):
    names, weights = ["a1", "a2", "a3"], [1.0, 0.7, 0.4]
    density = None if method in ("linear", "task_arithmetic") else 0.5
    out = tmp_path / method
    merge_adapters(
        [lora_family.adapters[n] for n in names],
        out,
        method=method,
        weights=weights,
        density=density,
        rank=64,
        seed=7,
    )
    got = read_deltas(out)
    union = sorted(set().union(*(lora_family.deltas[n] for n in names)))
    assert sorted(got) == union
    for module in union:
        shape = next(lora_family.deltas[n][module].shape for n in names if module in lora_family.deltas[n])
        deltas = [lora_family.deltas[n].get(module, torch.zeros(shape)) for n in names]
        mp = [{"weight": w, **({"density": density} if density is not None else {})} for w in weights]
        base = None if method == "linear" else torch.zeros(shape)
        want = merge_tensors(method, deltas, base=base, model_params=mp, name=f"{module}.weight", seed=7)
        torch.testing.assert_close(got[module], want, atol=2e-5, rtol=1e-4, msg=module)
    if density is not None:  # sparsification really happened
        module = "model.layers.0.self_attn.q_proj"
        dense = sum(w * lora_family.deltas[n][module] for n, w in zip(names, weights))
        assert not torch.allclose(got[module], dense, atol=1e-3)


def test_dare_is_seeded(lora_family: LoraFamily, tmp_path):
    paths = [lora_family.adapters["a1"], lora_family.adapters["a2"]]
    files = [
        merge_adapters(paths, tmp_path / f"d{i}", method="dare_linear", density=0.5, seed=s, hash_files=True).files
        for i, s in enumerate((3, 3, 4))
    ]
    assert files[0] == files[1]
    assert files[0]["adapter_model.safetensors"] != files[2]["adapter_model.safetensors"]


def test_merged_adapter_loads_in_peft_and_matches_manual_fold(lora_family: LoraFamily, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names, weights = ["a1", "a2", "a3"], [0.5, 1.5, -0.7]
    for method, rank in (("cat", None), ("ties", None), ("svd", 5)):
        out = tmp_path / method
        extra = {"density": 0.6} if method == "ties" else {}
        merge_adapters(
            [lora_family.adapters[n] for n in names], out, method=method, weights=weights, rank=rank, **extra
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(build_base(), out).eval()
        assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
        adapted = {n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
        merged = read_deltas(out)
        assert adapted == set(merged)
        if method == "cat":
            assert_deltas_close(merged, expected_sum(lora_family, names, weights))
        torch.testing.assert_close(
            logits(model, lora_family.input_ids), lora_family.logits_base_plus(merged), atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("name", ["a2", "a3"])
def test_fold_matches_peft_merge_and_unload(lora_family: LoraFamily, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"folded-{name}"
    result = fold_adapter(lora_family.adapters[name], lora_family.base, out)
    assert result.folded == len(lora_family.deltas[name])
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    folded = AutoModelForCausalLM.from_pretrained(out).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(build_base(), lora_family.adapters[name]).merge_and_unload().eval()
    torch.testing.assert_close(
        logits(folded, lora_family.input_ids), logits(reference, lora_family.input_ids), atol=1e-5, rtol=1e-4
    )
    base_logits = logits(build_base(), lora_family.input_ids)
    assert not torch.allclose(logits(folded, lora_family.input_ids), base_logits, atol=1e-3)
