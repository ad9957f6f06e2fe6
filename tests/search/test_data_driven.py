"""AdaMerging, Frank-Wolfe merging and representation surgery on tiny transformers models."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from convergent.checkpoint import open_checkpoint
from convergent.errors import RecipeError
from convergent.search.adamerging import adamerge, prediction_entropy
from convergent.search.frank_wolfe import frank_wolfe_merge
from convergent.search.surgery import attach_surgery, fit_surgery, representations
from convergent.stats.hf import batches, load_model, pad_id, tokenize
from tests.stats import tiny


@pytest.fixture(scope="module")
def bert3():
    return tiny.cached_family("bert")


@pytest.fixture(scope="module")
def llama3():
    return tiny.cached_family("llama")


def entropy_of(model_dir, texts) -> float:
    loaded = load_model(model_dir)
    ids = tokenize(loaded.tokenizer, texts, 32)
    ((input_ids, mask),) = batches(ids, len(ids), pad_id(loaded.tokenizer))
    with torch.no_grad():
        logits = loaded.model(input_ids=input_ids, attention_mask=mask).logits
    return float(prediction_entropy(logits, mask, loaded.kind))


def test_adamerging_lowers_entropy_versus_task_arithmetic(bert3, tmp_path):
    from convergent.engine import run_merge
    from convergent.recipe import build_job, parse_recipe

    base, models = bert3
    texts = tiny.texts(16, seed=4)
    result = adamerge(base, models, texts, granularity="layer", steps=12, lr=0.05, seed=1, out_dir=tmp_path / "ada")
    assert result.entropy_after < result.entropy_before - 0.05
    assert set(result.coefficients) == {"other", "layer 0", "layer 1"}
    assert all(0.0 <= c <= 1.0 for cs in result.coefficients.values() for c in cs)
    # Plain task arithmetic at the initial coefficient (0.3), merged by the engine.
    recipe = parse_recipe(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(base),
                "models": [{"model": str(m), "parameters": {"weight": 0.3}} for m in models],
            }
        )
    )
    run_merge(build_job(recipe, tmp_path / "ta"))
    plain = entropy_of(tmp_path / "ta", texts)
    adapted = entropy_of(tmp_path / "ada", texts)
    assert plain == pytest.approx(result.entropy_before, abs=1e-4)
    assert adapted == pytest.approx(result.entropy_after, abs=1e-4)
    assert adapted < plain
    report = json.loads((tmp_path / "ada" / "adamerging.json").read_text())
    assert report["coefficients"] == result.coefficients


def test_adamerging_task_wise_and_bad_granularity(bert3):
    base, models = bert3
    result = adamerge(base, models, tiny.texts(8), granularity="task", steps=5, lr=0.05, batch_size=3, seed=2)
    assert list(result.coefficients) == ["all"] and len(result.coefficients["all"]) == 2
    # Same seed (minibatch order), same coefficients.
    again = adamerge(base, models, tiny.texts(8), granularity="task", steps=5, lr=0.05, batch_size=3, seed=2)
    assert again.coefficients == result.coefficients and again.history == result.history
    with pytest.raises(RecipeError, match="unknown granularity"):
        adamerge(base, models, tiny.texts(4), granularity="block")


def _mixture_loss(models):
    a, b = (open_checkpoint(m) for m in models)
    target = {n: 0.5 * (a.read(n) + b.read(n)) for n in a.names()}

    def loss(model):
        return sum(((p - target[n]) ** 2).sum() for n, p in model.named_parameters())

    return loss


def test_frank_wolfe_converges_to_the_objective_and_resumes(llama3, tmp_path):
    base, models = llama3
    loss = _mixture_loss(models)
    full = frank_wolfe_merge(base, models, loss, iterations=8, out_dir=tmp_path / "fw")
    assert full.final_loss < 0.05 * full.initial_loss
    assert full.history[0]["step"] == 1.0
    for coeffs in full.coefficients.values():
        assert coeffs == pytest.approx([0.5, 0.5], abs=0.1)
    # The written model is base + sum_k c_k tau_k with the reported coefficients.
    name = "model.layers.1.mlp.up_proj.weight"
    b, m0, m1 = (open_checkpoint(p).read(name) for p in (base, *models))
    c = full.coefficients[name]
    expected = b + c[0] * (m0 - b) + c[1] * (m1 - b)
    torch.testing.assert_close(open_checkpoint(tmp_path / "fw").read(name), expected, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "fw" / "recipe.yaml").exists()
    state = tmp_path / "fw.json"
    frank_wolfe_merge(base, models, loss, iterations=3, state_path=state)
    resumed = frank_wolfe_merge(base, models, loss, iterations=8, state_path=state)
    assert resumed.coefficients == full.coefficients
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_frank_wolfe_cli_with_loss_module_and_lm_data(llama3, tmp_path):
    from typer.testing import CliRunner

    from convergent.cli.app import app

    base, models = llama3
    module = tmp_path / "myloss.py"
    module.write_text(
        "from safetensors.torch import load_file\n"
        f"A = load_file({str(models[0] / 'model.safetensors')!r})\n"
        "def loss(model):\n"
        "    return sum(((p - A[n]) ** 2).sum() for n, p in model.named_parameters())\n"
    )
    args = ["fw-merge", *map(str, models), "--base", str(base), "--out", str(tmp_path / "o"), "--iterations", "2"]
    result = CliRunner().invoke(app, [*args, "--loss", f"{module}:loss", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["final_loss"] < 1e-6  # the first step lands on model 0 exactly
    data_file = tmp_path / "d.txt"
    data_file.write_text("\n".join(tiny.texts(6)))
    args = ["fw-merge", *map(str, models), "--base", str(base), "--out", str(tmp_path / "lm"), "--iterations", "2"]
    result = CliRunner().invoke(app, [*args, "--data", str(data_file), "--granularity", "model", "--json"])
    assert result.exit_code == 0, result.output
    lm = json.loads(result.stdout)
    assert lm["final_loss"] <= lm["initial_loss"] + 1e-6
    with pytest.raises(RecipeError, match="exactly one of"):
        frank_wolfe_merge(base, models, iterations=1)


def test_representation_surgery_aligns_features(bert3, tmp_path):
    base, models = bert3
    texts = tiny.texts(16, seed=6)
    out = tmp_path / "surgery.safetensors"
    result = fit_surgery(base, models[0], texts, rank=4, steps=150, lr=1e-2, out=out)
    assert result.head == "classifier"
    assert result.l1_after < 0.7 * result.l1_before
    merged = load_model(base)
    ids = tokenize(merged.tokenizer, texts, 128)
    task = representations(load_model(models[0]).model, ids, 8, 0)
    handle = attach_surgery(merged.model, out)
    fixed = representations(merged.model, ids, 8, 0)
    assert float((fixed - task).abs().mean()) == pytest.approx(result.l1_after, rel=1e-4)
    handle.remove()
    plain = representations(merged.model, ids, 8, 0)
    assert float((plain - task).abs().mean()) == pytest.approx(result.l1_before, rel=1e-4)
