"""Build small real checkpoints with transformers (random init, seeded; nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch


def _config(arch: str):
    from transformers import BertConfig, LlamaConfig, MistralConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    if arch == "mistral":
        return MistralConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=32,
        )
    if arch == "bert":
        return BertConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    raise ValueError(arch)


def build_model(arch: str, seed: int):
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(arch)
    model = AutoModel.from_config(config) if arch == "bert" else AutoModelForCausalLM.from_config(config)
    return model.eval()


def save_family(
    root: Path, arch: str, count: int, dtype: torch.dtype = torch.float32, shard: str | None = None
) -> tuple[Path, list[Path]]:
    """A base and ``count`` fine-tunes (base + seeded noise) under ``root``."""
    base = build_model(arch, 0).to(dtype)
    paths = []
    base_dir = root / f"{arch}-base"
    base.save_pretrained(base_dir, max_shard_size=shard or "5GB")
    for i in range(count):
        tuned = build_model(arch, 0).to(dtype)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_((torch.randn(p.shape, generator=gen) * 0.02).to(dtype))
        path = root / f"{arch}-ft{i}"
        tuned.save_pretrained(path, max_shard_size=shard or "5GB")
        paths.append(path)
    return base_dir, paths
