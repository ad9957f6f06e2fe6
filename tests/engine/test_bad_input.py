"""Bad input: one clear error, non-zero exit, nothing written, nothing existing touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from convergent.cli.app import app
from convergent.errors import OutputError

runner = CliRunner()


def run_merge(tmp_path: Path, recipe: dict, *extra: str, out: str = "out"):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return runner.invoke(app, ["merge", str(path), str(tmp_path / out), *extra])


def assert_failed(result, *fragments: str) -> None:
    assert result.exit_code != 0
    message = str(result.exception) if result.exception and not isinstance(result.exception, SystemExit) else ""
    text = (result.output or "") + message
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def linear(*models: Path, **params) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m)} for m in models], "parameters": params or None}


def copy_model(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def no_partial_outputs(tmp_path: Path) -> bool:
    return not any(p.name.startswith(".out") for p in tmp_path.iterdir()) and not (tmp_path / "out").exists()


def test_missing_model_path(tmp_path, llama_family):
    _, tuned = llama_family
    result = run_merge(tmp_path, linear(tuned[0], tmp_path / "nope"))
    assert_failed(result, "not found")
    assert no_partial_outputs(tmp_path)


def test_tensor_missing_in_one_model_names_both(tmp_path, llama_family):
    _, tuned = llama_family
    broken = copy_model(tuned[0], tmp_path / "broken", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    result = run_merge(tmp_path, linear(tuned[2], broken))
    assert_failed(result, "model.layers.1.mlp.up_proj.weight", "broken", str(tuned[2]))
    assert no_partial_outputs(tmp_path)


def test_extra_tensor_in_model_is_named(tmp_path, llama_family):
    _, tuned = llama_family
    extra = copy_model(tuned[0], tmp_path / "extra", lambda t: t.__setitem__("extra.weight", torch.zeros(3)))
    result = run_merge(tmp_path, linear(tuned[2], extra))
    assert_failed(result, "extra.weight")


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, llama_family):
    _, tuned = llama_family
    name = "model.layers.0.mlp.up_proj.weight"
    wrong = copy_model(
        tuned[0], tmp_path / "wrong", lambda t: t.__setitem__(name, torch.zeros(5, 7, dtype=t[name].dtype))
    )
    result = run_merge(tmp_path, linear(tuned[2], wrong))
    assert_failed(result, "shape mismatch", name, "[5, 7]", "[128, 64]")
    assert no_partial_outputs(tmp_path)


def test_nonfinite_refused_unless_allowed(tmp_path, llama_family):
    _, tuned = llama_family
    name = "model.layers.0.mlp.up_proj.weight"

    def poison(t):
        t[name] = t[name].clone()
        t[name][3, 4] = float("nan")

    nan_model = copy_model(tuned[0], tmp_path / "nan", poison)
    result = run_merge(tmp_path, linear(tuned[2], nan_model))
    assert_failed(result, "NaN or Inf", name, "--allow-nonfinite")
    assert no_partial_outputs(tmp_path)
    ok = run_merge(tmp_path, linear(tuned[2], nan_model), "--allow-nonfinite")
    assert ok.exit_code == 0, ok.output
    assert torch.isnan(load_file(tmp_path / "out" / "model.safetensors")[name][3, 4])


@pytest.mark.parametrize(
    ("method", "value", "weight"),
    [
        ("linear", float("inf"), 0.0),  # 0 * inf is NaN: still caught, through the output probe
        ("linear", float("-inf"), 1.0),
        ("task_arithmetic", float("nan"), 1.0),  # output probe, base + deltas
        ("ties", float("inf"), 1.0),  # sparsified: every input is probed
    ],
)
def test_nonfinite_input_named_whatever_the_method(tmp_path, llama_family, method, value, weight):
    base, tuned = llama_family
    name = "model.layers.1.self_attn.q_proj.weight"

    def poison(t):
        t[name] = t[name].clone()
        t[name][-1, -1] = value

    bad = copy_model(tuned[2], tmp_path / "poisoned", poison)
    recipe = {
        "merge_method": method,
        "models": [{"model": str(tuned[0])}, {"model": str(bad), "parameters": {"weight": weight}}],
    }
    if method != "linear":
        recipe["base_model"] = str(base)
    result = run_merge(tmp_path, recipe)
    assert_failed(result, "NaN or Inf", name, "poisoned")
    assert no_partial_outputs(tmp_path)


def test_finite_inputs_that_overflow_are_not_an_input_error(tmp_path, llama_family):
    """A weighted sum may overflow float32 to inf; every input is finite, so the merge goes on."""
    _, tuned = llama_family
    name = "model.layers.0.mlp.up_proj.weight"

    def huge(t):
        t[name] = torch.full_like(t[name], 3e38, dtype=torch.float32).to(t[name].dtype)

    a = copy_model(tuned[0], tmp_path / "a", huge)
    b = copy_model(tuned[2], tmp_path / "b", huge)
    result = run_merge(tmp_path, linear(a, b, normalize=False))
    assert result.exit_code == 0, result.output
    assert torch.isinf(load_file(tmp_path / "out" / "model.safetensors")[name].float()).all()


def test_non_floating_tensors_copied_when_equal_refused_when_not(tmp_path, llama_family):
    _, tuned = llama_family
    a = copy_model(tuned[0], tmp_path / "a", lambda t: t.__setitem__("ids", torch.arange(6)))
    b = copy_model(tuned[2], tmp_path / "b", lambda t: t.__setitem__("ids", torch.arange(6)))
    ok = run_merge(tmp_path, linear(a, b))
    assert ok.exit_code == 0, ok.output
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["ids"], torch.arange(6))
    c = copy_model(tuned[2], tmp_path / "c", lambda t: t.__setitem__("ids", torch.arange(6) * 2))
    result = run_merge(tmp_path, linear(a, c), out="out2")
    assert_failed(result, "non-floating tensor 'ids' differs")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda data: data[: len(data) // 2], "ends at byte"),
        (lambda data: (10**12).to_bytes(8, "little") + data[8:], "header length"),
        (lambda data: data[:8] + b"{not json" + data[17:], "not JSON"),
        (lambda data: data[:5], "no header"),
    ],
    ids=["truncated", "huge-header", "garbage-header", "tiny"],
)
def test_corrupt_safetensors(tmp_path, llama_family, damage, expected):
    _, tuned = llama_family
    bad = copy_model(tuned[0], tmp_path / "bad")
    file = bad / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    result = run_merge(tmp_path, linear(tuned[2], bad))
    assert_failed(result, "corrupt or truncated safetensors", expected)
    assert no_partial_outputs(tmp_path)


def test_unknown_strategy_and_parameter_suggest_names(tmp_path, llama_family):
    _, tuned = llama_family
    result = run_merge(tmp_path, {**linear(tuned[0], tuned[2]), "merge_method": "tie"})
    assert_failed(result, "unknown merge method 'tie'", "did you mean")
    result = run_merge(tmp_path, linear(tuned[0], tuned[2], normalise=True))
    assert_failed(result, "unknown parameter 'normalise'", "did you mean 'normalize'")
    recipe = linear(tuned[0], tuned[2])
    recipe["models"][0]["paramters"] = {"weight": 1}
    assert_failed(run_merge(tmp_path, recipe), "paramters", "did you mean 'parameters'")
    assert_failed(run_merge(tmp_path, {**linear(tuned[0]), "dtype": "float13"}), "unknown dtype 'float13'")
    assert_failed(run_merge(tmp_path, {**linear(tuned[0]), "merge_methd": "x"}), "merge_methd")


def test_weights_summing_to_zero_under_normalize(tmp_path, llama_family):
    _, tuned = llama_family
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(tuned[0]), "parameters": {"weight": 1.0}},
            {"model": str(tuned[2]), "parameters": {"weight": -1.0}},
        ],
    }
    assert_failed(run_merge(tmp_path, recipe), "weights sum to zero", "normalize: false")
    assert no_partial_outputs(tmp_path)


def test_existing_output_untouched_without_overwrite(tmp_path, llama_family):
    _, tuned = llama_family
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_merge(tmp_path, linear(tuned[0], tuned[2]))
    assert_failed(result, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    ok = run_merge(tmp_path, linear(tuned[0], tuned[2]), "--overwrite")
    assert ok.exit_code == 0, ok.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_failed_merge_leaves_previous_output_in_place(tmp_path, llama_family):
    """A failure after planning (NaN found mid-run) leaves the old output as it was."""
    _, tuned = llama_family
    first = run_merge(tmp_path, linear(tuned[0], tuned[2]))
    assert first.exit_code == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    name = "model.layers.3.mlp.down_proj.weight"

    def poison(t):
        t[name] = torch.full_like(t[name], float("inf"))

    bad = copy_model(tuned[0], tmp_path / "inf", poison)
    result = run_merge(tmp_path, linear(bad, tuned[2]), "--overwrite")
    assert_failed(result, "NaN or Inf")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())


@pytest.mark.parametrize("direct", [True, False])
def test_a_disk_error_mid_merge_is_one_line_and_leaves_nothing(tmp_path, llama_family, monkeypatch, direct):
    """The disk fails on the 4th output write: direct, on a writer thread; buffered, in a merge thread."""
    import os

    from convergent.checkpoint import direct_io
    from convergent.checkpoint import writer as writer_module

    _, tuned = llama_family
    monkeypatch.setattr(writer_module, "DIRECT_IO", direct)
    small = 64 << 10  # staging runs this small make several writes even for a tiny model
    monkeypatch.setattr(direct_io.WriteQueue.__init__, "__defaults__", (4, small, direct_io.ALIGN, 2))
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    result = run_merge(tmp_path, linear(tuned[0], tuned[2]), "--threads", "2")
    assert_failed(result, "No space left on device")
    assert isinstance(result.exception, OutputError), "one clear error (the CLI prints it as one line)"
    assert "model.safetensors" in str(result.exception)
    assert len(calls) >= 4
    assert no_partial_outputs(tmp_path)


def test_pickle_files_are_never_unpickled(tmp_path):
    """A .bin whose pickle would run code is refused by weights_only loading."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("open('pwned','w').write('x')",))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    result = run_merge(tmp_path, linear(folder, folder))
    assert_failed(result, "weights-only")
    assert not Path("pwned").exists()


def test_bin_state_dict_is_read(tmp_path, llama_family):
    _, tuned = llama_family
    tensors = load_file(tuned[0] / "model.safetensors")
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(tensors, folder / "pytorch_model.bin")
    shutil.copy(tuned[0] / "config.json", folder / "config.json")
    ok = run_merge(tmp_path, linear(folder, tuned[0]), "--json")
    assert ok.exit_code == 0, ok.output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(merged["model.norm.weight"], tensors["model.norm.weight"])
    assert "config.json" in json.loads(ok.stdout)["files"]
