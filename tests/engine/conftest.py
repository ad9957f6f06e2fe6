from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints import save_family


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A bf16 Llama base and 3 fine-tunes; ft1 is sharded over several files."""
    root = tmp_path_factory.mktemp("llama")
    base, tuned = save_family(root, "llama", 3, torch.bfloat16)
    from tests.checkpoints import build_model

    sharded = root / "llama-ft1-sharded"
    model = build_model("llama", 0).to(torch.bfloat16)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(tuned[1] / "model.safetensors"), strict=False)
    model.save_pretrained(sharded, max_shard_size="100KB")
    return base, [tuned[0], sharded, tuned[2]]


@pytest.fixture(scope="session")
def mistral_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return save_family(tmp_path_factory.mktemp("mistral"), "mistral", 2, torch.float16)


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return save_family(tmp_path_factory.mktemp("bert"), "bert", 2, torch.float32)
