"""Fisher and Gram statistics against straightforward references; RegMean with them is least squares."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from convergent.checkpoint import open_checkpoint
from convergent.engine import MergeJob, ModelInput, run_merge
from convergent.errors import MergeInputError
from convergent.stats import check_statistics, compute_fisher, compute_gram, load_texts, save_statistics
from convergent.stats.hf import checkpoint_hash
from tests.stats import tiny


def _hf(path, cls_name):
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def test_fisher_of_causal_lm_matches_per_example_autograd(llama_pair):
    path = llama_pair[1][0]
    texts = tiny.texts(6, seed=3)
    stats = compute_fisher(path, texts, max_length=16)
    model, tok = _hf(path, "LlamaForCausalLM")
    ref = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        model.zero_grad()
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad.double() ** 2
    assert stats.samples == 6 and stats.kind == "fisher"
    assert set(stats.tensors) == set(ref) == set(open_checkpoint(path).names())
    for name, value in stats.tensors.items():
        torch.testing.assert_close(value, (ref[name] / 6).float(), rtol=1e-5, atol=1e-10)
        assert value.shape == ref[name].shape


def test_fisher_of_classifier_uses_predicted_label(bert_pair):
    path = bert_pair[1][1]
    texts = tiny.texts(4, seed=5)
    stats = compute_fisher(path, texts, max_length=16)
    assert stats.metadata["target"] == "predicted"
    model, tok = _hf(path, "BertForSequenceClassification")
    ref = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        model.zero_grad()
        logits = model(input_ids=ids).logits
        loss = -torch.log_softmax(logits, -1)[0, logits[0].argmax()]
        loss.backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad.double() ** 2
    for name, value in stats.tensors.items():
        torch.testing.assert_close(value, (ref[name] / 4).float(), rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_gram_equals_hooked_inputs(arch, llama_pair, bert_pair):
    path = (llama_pair if arch == "llama" else bert_pair)[1][0]
    texts = tiny.texts(7, seed=1)
    stats = compute_gram(path, texts, batch_size=3, max_length=16)  # padded batches
    cls = "LlamaForCausalLM" if arch == "llama" else "BertForSequenceClassification"
    model, tok = _hf(path, cls)
    rows: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda _m, a, n=name: rows.setdefault(f"{n}.weight", []).append(a[0].reshape(-1, a[0].shape[-1]))
                )
            )
    with torch.no_grad():
        for text in texts:  # one example at a time: no padding at all
            model(input_ids=torch.tensor([tok(text)["input_ids"]]))
    assert set(stats.tensors) == set(rows)
    for name, parts in rows.items():
        x = torch.cat(parts).double()
        expected = (x.T @ x / x.shape[0]).float()
        torch.testing.assert_close(stats.tensors[name], expected, rtol=1e-4, atol=1e-6)
    assert stats.tokens == sum(len(tok(t)["input_ids"]) for t in texts)


def test_saved_file_has_metadata_and_fits_checkpoint(llama_pair, tmp_path):
    path = llama_pair[1][0]
    stats = compute_gram(path, tiny.texts(3), max_length=8)
    out = save_statistics(stats, tmp_path / "g.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "gram" and meta["samples"] == "3"
    assert meta["model_sha256"] == checkpoint_hash(path)
    assert check_statistics(out, path, kind="gram")["kind"] == "gram"
    with pytest.raises(MergeInputError, match="holds 'gram'"):
        check_statistics(out, path, kind="fisher")
    with pytest.raises(MergeInputError, match="another model"):
        check_statistics(out, path, model_sha256="0" * 64)


def test_regmean_with_computed_grams_is_the_least_squares_merge(llama_pair, tmp_path):
    _, (a, b) = llama_pair
    grams = []
    for i, model in enumerate((a, b)):
        stats = compute_gram(model, tiny.texts(10, seed=10 + i), batch_size=4, max_length=16)
        grams.append(save_statistics(stats, tmp_path / f"gram{i}.safetensors"))
    job = MergeJob(
        method="regmean",
        models=[ModelInput(open_checkpoint(m), statistics={"gram": open_checkpoint(g)}) for m, g in zip((a, b), grams)],
        out_dir=tmp_path / "merged",
    )
    run_merge(job)
    merged = open_checkpoint(tmp_path / "merged")
    name = "model.layers.0.mlp.down_proj.weight"
    w = [open_checkpoint(m).read(name).double() for m in (a, b)]
    g = [open_checkpoint(p).read(name).double() for p in grams]
    got = merged.read(name).double()
    # Least squares: argmin_W sum_i ||X_i W^T - X_i W_i^T||^2, solved from the normal equations.
    expected = torch.linalg.solve(g[0] + g[1], (w[0] @ g[0] + w[1] @ g[1]).T).T
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # ... and its gradient vanishes.
    grad = (got - w[0]) @ g[0] + (got - w[1]) @ g[1]
    assert grad.abs().max() < 1e-4
    # Non-linear tensors get the plain average.
    norm = "model.norm.weight"
    avg = (open_checkpoint(a).read(norm) + open_checkpoint(b).read(norm)) / 2
    torch.testing.assert_close(merged.read(norm), avg)


def test_load_texts_plain_and_jsonl(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("one two\n\n  three  \n")
    assert load_texts(plain) == ["one two", "three"]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "label": 1}) for t in ["x y", "z"]) + "\n")
    assert load_texts(jsonl) == ["x y", "z"]
    assert load_texts(jsonl, max_samples=1) == ["x y"]
    sniffed = tmp_path / "c.txt"
    sniffed.write_text('{"text": "hello"}\n')
    assert load_texts(sniffed) == ["hello"]
