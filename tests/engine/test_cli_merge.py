"""End to end through the CLI on checkpoints transformers builds and loads."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from convergent.checkpoint import open_checkpoint
from convergent.cli.app import app

runner = CliRunner()


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def merge_cli(*args: str) -> dict:
    result = runner.invoke(app, ["merge", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    assert gc.isenabled(), "the merge command left the cycle collector paused"
    return json.loads(result.stdout)


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    return {n: ckpt.read(n) for n in ckpt.names()}


def test_linear_llama_loads_and_matches_reference(tmp_path, llama_family):
    from transformers import AutoModelForCausalLM

    _base, tuned = llama_family
    weights = [1.0, 2.0, 3.0]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(tuned, weights)],
            "dtype": "bfloat16",
        },
    )
    out = tmp_path / "out"
    report = merge_cli(recipe, out, "--max-shard-size", "150KB")
    assert len([f for f in report["files"] if f.endswith(".safetensors")]) > 1, "expected a sharded output"
    assert "model.safetensors.index.json" in report["files"]
    assert "config.json" in report["files"]
    inputs = [load_all(p) for p in tuned]
    merged = load_all(out)
    assert set(merged) == set(inputs[0])
    for name, value in merged.items():
        ref = sum(w * t[name].float() for w, t in zip(weights, inputs)) / sum(weights)
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value.float(), ref.to(torch.bfloat16).float(), atol=0, rtol=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()


def test_recipe_gradient_and_filter_parameters(tmp_path, llama_family):
    """weight: [0, 1] interpolates over depth; filtered values apply by substring."""
    _, tuned = llama_family
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "linear",
            "models": [
                {"model": str(tuned[0]), "parameters": {"weight": 1.0}},
                {
                    "model": str(tuned[2]),
                    "parameters": {"weight": [{"filter": "self_attn", "value": 0.0}, {"value": [0.0, 3.0]}]},
                },
            ],
            "dtype": "float32",
        },
    )
    out = tmp_path / "out"
    merge_cli(recipe, out)
    a, b, merged = load_all(tuned[0]), load_all(tuned[2]), load_all(out)
    # 4 layers: t = 0, 1/3, 2/3, 1 -> second weight 0, 1, 2, 3 on MLP tensors; 0 on attention.
    for layer, w in enumerate([0.0, 1.0, 2.0, 3.0]):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        expected = (a[name].float() + w * b[name].float()) / (1 + w)
        torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=1e-6)
        attn = f"model.layers.{layer}.self_attn.q_proj.weight"
        torch.testing.assert_close(merged[attn], a[attn].float())
    # embeddings sit outside the layers: t = 0 -> weight 0
    torch.testing.assert_close(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"].float())


@pytest.mark.parametrize("family", ["mistral_family", "bert_family"])
def test_other_architectures_load(tmp_path, family, request):
    from transformers import AutoModel

    _base, tuned = request.getfixturevalue(family)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in tuned]},
    )
    out = tmp_path / "out"
    merge_cli(recipe, out)
    model = AutoModel.from_pretrained(out)
    hidden = model(torch.tensor([[1, 2, 3]])).last_hidden_state
    assert torch.isfinite(hidden).all()
    first = load_all(tuned[0])
    merged = load_all(out)
    name = next(n for n in first if n.endswith("weight") and first[n].dim() == 2)
    assert merged[name].dtype == first[name].dtype  # no dtype given: inputs' dtype kept
    expected = ((first[name].float() + load_all(tuned[1])[name].float()) / 2).to(first[name].dtype)
    assert torch.equal(merged[name], expected)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_output_bytes_identical_across_threads_and_chunking(tmp_path, llama_family, method):
    # ties runs fused kernels on the stored bfloat16 bytes, dare_ties the tensor path: both held and streamed
    base, tuned = llama_family
    params = {"weight": 0.5} if method == "linear" else {"weight": 0.7, "density": 0.4}
    models = [{"model": str(p), "parameters": {**params, "weight": i + params["weight"]}} for i, p in enumerate(tuned)]
    spec = {"merge_method": method, "models": models}
    if method != "linear":
        spec["base_model"] = str(base)
    recipe = write_recipe(tmp_path / "r.yaml", spec)
    hashes = set()
    for threads, memory in [(1, "2GB"), (2, "2GB"), (4, "64KB"), (3, "10KB")]:
        report = merge_cli(
            recipe, tmp_path / f"out-{threads}-{memory}", "--threads", str(threads), "--memory-limit", memory
        )
        hashes.add(json.dumps(report["files"], sort_keys=True))
    assert len(hashes) == 1


def test_passthrough_slices_stack_layers(tmp_path, llama_family):
    from transformers import AutoModelForCausalLM

    base, tuned = llama_family
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(base), "layer_range": [0, 3]}]},
                {"sources": [{"model": str(tuned[0]), "layer_range": [1, 4]}]},
            ],
            "dtype": "bfloat16",
        },
    )
    out = tmp_path / "out"
    merge_cli(recipe, out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    merged, b, t = load_all(out), load_all(base), load_all(tuned[0])
    assert torch.equal(merged["model.layers.2.mlp.down_proj.weight"], b["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(merged["model.layers.3.mlp.down_proj.weight"], t["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(merged["model.layers.5.mlp.down_proj.weight"], t["model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], t["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[5, 6]])).logits).all()


def test_console_script_exit_codes(tmp_path, llama_family):
    """The installed entry point: success prints JSON; bad input one line on stderr, exit 1."""
    _, tuned = llama_family
    recipe = write_recipe(
        tmp_path / "r.yaml", {"merge_method": "linear", "models": [{"model": str(p)} for p in tuned[:2]]}
    )
    ok = subprocess.run(
        [sys.executable, "-m", "convergent", "merge", str(recipe), str(tmp_path / "o"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "model.safetensors" in json.loads(ok.stdout)["files"]
    bad = write_recipe(tmp_path / "bad.yaml", {"merge_method": "lineer", "models": [{"model": str(tuned[0])}]})
    fail = subprocess.run(
        [sys.executable, "-m", "convergent", "merge", str(bad), str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fail.returncode == 1
    assert "did you mean 'linear'" in fail.stderr
    assert "Traceback" not in fail.stderr
    assert not (tmp_path / "o2").exists()


def test_fast_exit_still_runs_exit_handlers_and_flushes(tmp_path, llama_family):
    """The CLI skips interpreter teardown once torch is loaded; exit handlers and piped output survive it."""
    _, tuned = llama_family
    marker = tmp_path / "atexit-ran"
    script = (
        "import atexit, pathlib, sys\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
        "import torch  # the fast path is taken only with torch loaded\n"
        "from convergent.cli.app import main\n"
        f"sys.argv = ['convergent', 'inspect', {str(tuned[0])!r}, '--json']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tensors"] > 0  # the whole JSON document reached the pipe
    assert marker.read_text() == "yes"


def test_inspect_json(llama_family):
    base, _ = llama_family
    result = runner.invoke(app, ["inspect", str(base), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = load_file(base / "model.safetensors")
    assert data["tensors"] == len(expected)
    assert data["parameters"] == sum(t.numel() for t in expected.values())


def test_strategies_lists_parameters_json():
    result = runner.invoke(app, ["strategies", "--json"])
    assert result.exit_code == 0, result.output
    listing = {s["name"]: s for s in json.loads(result.stdout)}
    assert {"linear", "passthrough"} <= set(listing)
    params = {p["name"]: p for p in listing["linear"]["parameters"]}
    assert params["normalize"]["default"] is True


def test_unlisted_base_model_joins_methods_that_ignore_bases(tmp_path, llama_family):
    """As in mergekit: karcher with an unlisted base_model averages the base in too."""
    from convergent.strategies import merge_tensors

    base, tuned = llama_family
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "karcher",
            "base_model": str(base),
            "models": [{"model": str(p)} for p in tuned[:2]],
            "dtype": "float32",
        },
    )
    merge_cli(recipe, tmp_path / "out")
    name = "model.layers.1.mlp.gate_proj.weight"
    inputs = [load_all(p)[name] for p in [*tuned[:2], base]]
    expected = merge_tensors("karcher", inputs)
    torch.testing.assert_close(load_all(tmp_path / "out")[name], expected, rtol=0, atol=0)
