"""Loading a local transformers model folder and turning texts into batches.

Only local folders are read (``local_files_only=True``): convergent never
downloads. The model class is the one named in ``config.json``'s
``architectures`` (so parameter names match the checkpoint's tensor names),
loaded in float32 and put in eval mode.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convergent.errors import CheckpointError

#: What a model's output means, from its class name.
CAUSAL_LM = "causal-lm"  # logits [B, T, V] over the next token
CLASSIFIER = "classifier"  # logits [B, C] per sequence
TOKEN_HEAD = "token-head"  # logits [B, T, V] per position (masked LM, token classification)
NO_HEAD = "no-head"  # bare encoder/decoder: hidden states only


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def model_kind(architecture: str) -> str:
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return CAUSAL_LM
    if architecture.endswith("ForSequenceClassification"):
        return CLASSIFIER
    if architecture.endswith(("ForMaskedLM", "ForTokenClassification")):
        return TOKEN_HEAD
    return NO_HEAD


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    architecture: str
    kind: str
    path: Path


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: not a transformers model folder (no config.json)",
            "statistics and data-driven merges need a Hugging Face model folder with config.json and tokenizer files",
        )
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}/config.json is not valid JSON ({exc})") from None


def load_model(model_dir: str | Path, tokenizer: bool = True) -> LoadedModel:
    """The model in ``model_dir`` (float32, eval mode) and its tokenizer, from local files only."""
    import transformers

    _quiet_transformers()
    path = Path(model_dir)
    config = read_config(path)
    archs = config.get("architectures") or []
    arch = archs[0] if archs else "AutoModel"
    cls = getattr(transformers, arch, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls, arch = transformers.AutoModel, "AutoModel"
    try:
        model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types
        raise CheckpointError(
            f"{path}: transformers cannot load this model ({type(exc).__name__}: {str(exc)[:300]})",
            "statistics need a model folder that transformers loads offline",
        ) from None
    model.eval()
    tok = None
    if tokenizer:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path}: no usable tokenizer ({type(exc).__name__}: {str(exc)[:200]})",
                "copy the tokenizer files of the base model into the model folder",
            ) from None
    return LoadedModel(model, tok, arch, model_kind(arch), path)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text (truncated to ``max_length``, special tokens added); empty ones dropped."""
    if max_length < 1:
        raise ValueError("max_length must be at least 1")
    out = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if ids:
            out.append(list(ids))
    return out


def pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def batches(ids: Sequence[list[int]], batch_size: int, pad: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches, right-padded with ``pad`` (masked out)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    for start in range(0, len(ids), batch_size):
        group = ids[start : start + batch_size]
        width = max(len(x) for x in group)
        input_ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, x in enumerate(group):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        yield input_ids, mask


def checkpoint_hash(model_dir: str | Path) -> str:
    """sha256 over every tensor (name, dtype, shape, sha256 of its bytes), in name order.

    Independent of sharding and file layout: the same weights saved in one
    file or in many shards hash the same.
    """
    from convergent.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    outer = hashlib.sha256(b"convergent/tensors/v1\x00")
    try:
        for name in ckpt.names():
            tensor = ckpt.read(name).contiguous()
            inner = hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            dtype = str(tensor.dtype).removeprefix("torch.")
            outer.update(f"{name}\x00{dtype}\x00{list(tensor.shape)}\x00{inner}\n".encode())
    finally:
        ckpt.close()
    return outer.hexdigest()
