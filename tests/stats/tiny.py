"""Tiny transformers models with a word-level tokenizer, built from configs (seeded; nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def config(arch: str):
    from transformers import BertConfig, LlamaConfig

    vocab = len(SPECIAL) + len(WORDS)
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    if arch == "bert":
        return BertConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            num_labels=3,
            pad_token_id=0,
        )
    raise ValueError(arch)


def build(arch: str, seed: int):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = config(arch)
    cls = AutoModelForCausalLM if arch == "llama" else AutoModelForSequenceClassification
    return cls.from_config(cfg).eval()


def save(model, path: Path) -> Path:
    from transformers.utils import logging

    logging.disable_progress_bar()
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def family(root: Path, arch: str, count: int, noise: float = 0.05) -> tuple[Path, list[Path]]:
    """A base and ``count`` fine-tunes (base + seeded noise), with tokenizers."""
    base = save(build(arch, 0), root / f"{arch}-base")
    tuned = []
    for i in range(count):
        model = build(arch, 0)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
        tuned.append(save(model, root / f"{arch}-ft{i}"))
    return base, tuned


def texts(count: int, seed: int = 0, lo: int = 2, hi: int = 9) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(lo, hi, (1,), generator=gen))
        ids = torch.randint(0, len(WORDS), (n,), generator=gen).tolist()
        out.append(" ".join(WORDS[i] for i in ids))
    return out


_CACHE: dict[tuple[str, int, float], tuple[Path, list[Path]]] = {}


def cached_family(arch: str, count: int = 2, noise: float | None = None) -> tuple[Path, list[Path]]:
    """:func:`family`, built once per test session (shared by tests/stats and tests/search); do not modify it."""
    import atexit
    import shutil
    import tempfile

    noise = {"llama": 0.05, "bert": 0.3}[arch] if noise is None else noise
    key = (arch, count, noise)
    if key not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix=f"convergent-tiny-{arch}-"))
        atexit.register(shutil.rmtree, root, True)
        _CACHE[key] = family(root, arch, count, noise)
    return _CACHE[key]
