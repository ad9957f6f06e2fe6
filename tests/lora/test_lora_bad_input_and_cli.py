"""Bad inputs (clear errors, nothing written) and the ``lora`` CLI group."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from convergent.cli.lora_cmds import lora_app, register
from convergent.errors import CheckpointError, MergeInputError, OutputError, RecipeError
from convergent.lora import LoraAdapter, fold_adapter, merge_adapters
from tests.lora.conftest import LoraFamily

runner = CliRunner()


def test_mismatched_shapes_name_module_and_shapes(lora_family: LoraFamily, bad_shape_adapter, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MergeInputError) as err:
        merge_adapters([lora_family.adapters["a2"], bad_shape_adapter], out, method="cat")
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "[64, 64]" in msg and "[64, 32]" in msg
    assert not out.exists()


def test_fold_into_wrong_base_names_module_and_shapes(lora_family: LoraFamily, bad_shape_adapter, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MergeInputError) as err:
        fold_adapter(bad_shape_adapter, lora_family.base, out)
    assert "model.layers.0.self_attn.q_proj" in str(err.value) and "[64, 32]" in str(err.value)
    assert not out.exists()


def test_strict_refuses_different_targets(lora_family: LoraFamily, tmp_path):
    a = lora_family.adapters
    with pytest.raises(MergeInputError, match=r"--strict.*(k_proj|embed_tokens)"):
        merge_adapters([a["a1"], a["a3"]], tmp_path / "out", method="cat", strict=True)
    assert not (tmp_path / "out").exists()
    # same targets, different ranks: fine even with --strict
    result = merge_adapters([a["a1"], a["a2"]], tmp_path / "ok", method="svd", strict=True)
    assert result.modules == 4 and not result.warnings


def test_missing_modules_count_as_zero_with_a_note(lora_family: LoraFamily, tmp_path):
    a = lora_family.adapters
    result = merge_adapters([a["a1"], a["a3"]], tmp_path / "out", method="cat")
    assert any("counted as zero delta" in w for w in result.warnings)


def test_different_base_models_only_warn(renamed_adapters, tmp_path):
    result = merge_adapters(renamed_adapters, tmp_path / "out", method="cat")
    assert any("someone/model-a" in w and "someone/model-b" in w for w in result.warnings)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_not_an_adapter_folder(lora_family: LoraFamily, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, text in (
        (lora_family.base, "not a PEFT adapter folder"),
        (empty, "not a PEFT adapter folder"),
        (tmp_path / "nowhere", "no such adapter folder"),
        (lora_family.base / "config.json", "it is a file"),
    ):
        with pytest.raises(CheckpointError, match=text):
            LoraAdapter(path)
        with pytest.raises(CheckpointError, match=text):
            merge_adapters([lora_family.adapters["a1"], path], tmp_path / "out")
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        fold_adapter(lora_family.base, lora_family.base, tmp_path / "out")
    with pytest.raises(CheckpointError, match="not a base model"):
        fold_adapter(lora_family.adapters["a1"], lora_family.adapters["a2"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_adapter_contents(lora_family: LoraFamily, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    dora = tmp_path / "dora"
    shutil.copytree(lora_family.adapters["a1"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(MergeInputError, match="DoRA"):
        LoraAdapter(dora)

    extra = tmp_path / "extra"
    shutil.copytree(lora_family.adapters["a1"], extra)
    tensors = load_file(extra / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(128, 64)
    save_file(tensors, extra / "adapter_model.safetensors")
    with pytest.raises(MergeInputError, match=r"lm_head\.weight' is not a LoRA factor"):
        LoraAdapter(extra)

    wrong_rank = tmp_path / "wrong-rank"
    shutil.copytree(lora_family.adapters["a1"], wrong_rank)
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**cfg, "r": 5}))
    with pytest.raises(CheckpointError, match=r"has rank 4 but adapter_config\.json says 5"):
        LoraAdapter(wrong_rank)


def test_bad_options(lora_family: LoraFamily, tmp_path):
    a = [lora_family.adapters["a1"], lora_family.adapters["a2"]]
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="3 weights for 2 adapters"):
        merge_adapters(a, out, weights=[1, 1, 1])
    with pytest.raises(RecipeError, match="--rank does not apply to 'cat'"):
        merge_adapters(a, out, method="cat", rank=4)
    with pytest.raises(RecipeError, match="did you mean 'ties'"):
        merge_adapters(a, out, method="tiez")
    with pytest.raises(RecipeError, match="--density does not apply"):
        merge_adapters(a, out, method="linear", density=0.5)
    with pytest.raises(RecipeError, match="takes no strategy parameters"):
        merge_adapters(a, out, method="svd", density=0.5)
    with pytest.raises(RecipeError, match="unknown parameter 'densty'"):
        merge_adapters(a, out, method="ties", params={"densty": 0.5})
    with pytest.raises(RecipeError, match="needs statistics"):
        merge_adapters(a, out, method="fisher")
    assert not out.exists()
    merge_adapters(a, out, method="cat")
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="--overwrite"):
        merge_adapters(a, out, method="svd", rank=2)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    merge_adapters(a, out, method="svd", rank=2, overwrite=True)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


def test_cli_merge_and_fold(lora_family: LoraFamily, tmp_path):
    a = lora_family.adapters
    out = tmp_path / "merged"
    result = runner.invoke(
        lora_app,
        [
            "merge",
            str(a["a1"]),
            str(a["a2"]),
            str(a["a3"]),
            "--out",
            str(out),
            "--method",
            "dare_ties",
            "--weights",
            "0.5,0.3,0.2",
            "--density",
            "0.5",
            "--rank",
            "8",
            "--seed",
            "11",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads(result.stdout)
    assert data["method"] == "dare_ties" and data["modules"] == 7
    assert data["ranks"] == [8]
    assert set(data["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert any("zero delta" in w for w in data["warnings"])

    folded = tmp_path / "folded"
    args = ["fold", str(out), "--base", str(lora_family.base), "--out", str(folded), "--json"]
    result = runner.invoke(lora_app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads(result.stdout)
    assert data["folded_modules"] == 7 and "model.safetensors" in data["files"] and "config.json" in data["files"]

    result = runner.invoke(lora_app, ["merge", str(a["a1"]), str(a["a3"]), "--out", str(tmp_path / "x"), "--strict"])
    assert result.exit_code != 0 and isinstance(result.exception, MergeInputError)
    result = runner.invoke(lora_app, ["merge", str(a["a1"]), "--out", str(tmp_path / "y"), "--weights", "a,b"])
    assert result.exit_code != 0 and isinstance(result.exception, RecipeError)
    result = runner.invoke(
        lora_app,
        [
            "merge",
            str(a["a1"]),
            str(a["a2"]),
            "--out",
            str(tmp_path / "z"),
            "--method",
            "linear",
            "--param",
            "normalize=false",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "merged 2 adapters (linear)" in result.stderr


def test_register_adds_lora_group():
    app = typer.Typer()

    @app.command()
    def other() -> None:
        """Another command."""

    register(app)
    result = runner.invoke(app, ["lora", "--help"])
    assert result.exit_code == 0 and "merge" in result.stdout and "fold" in result.stdout
