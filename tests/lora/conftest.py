"""A tiny Llama base and three random PEFT LoRA adapters on it (seeded; nothing downloaded).

* ``a1``: r=4, alpha=8 on q_proj, v_proj.
* ``a2``: r=8, alpha=16, rsLoRA, ``rank_pattern`` (layer 1 q_proj has rank 2)
  and ``alpha_pattern`` (v_proj alpha 3) on q_proj, v_proj.
* ``a3``: r=6, alpha=12 on q_proj, k_proj and embed_tokens (a different target
  set, an Embedding layer, and PEFT's saved base-layer copy of the embedding).

Each adapter comes with its reference deltas, taken from PEFT itself
(``get_delta_weight``) in the base weight's layout, so the tests never use
convergent's own reading of scales and patterns as the reference.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ADAPTERS = {
    "a1": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "a2": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "use_rslora": True,
        "rank_pattern": {"model.layers.1.self_attn.q_proj": 2},
        "alpha_pattern": {"v_proj": 3},
    },
    "a3": {"r": 6, "lora_alpha": 12, "target_modules": ["q_proj", "k_proj", "embed_tokens"]},
}


def build_base(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def lora_deltas(peft_model) -> dict[str, torch.Tensor]:
    """module path -> PEFT's own delta weight (base weight layout) for the 'default' adapter."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            out[name] = module.get_delta_weight("default").detach().clone().float()
    return out


@dataclass
class LoraFamily:
    base: Path
    adapters: dict[str, Path]
    deltas: dict[str, dict[str, torch.Tensor]]
    input_ids: torch.Tensor

    def logits_base_plus(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the base model with ``deltas`` added to its weights by hand."""
        model = build_base()
        state = model.state_dict()
        with torch.no_grad():
            for module, delta in deltas.items():
                state[f"{module}.weight"].add_(delta)
        return logits(model, self.input_ids)


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


@pytest.fixture(scope="session")
def lora_family(tmp_path_factory) -> LoraFamily:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora")
    base_dir = root / "base"
    build_base().save_pretrained(base_dir)
    paths, deltas = {}, {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(build_base(), LoraConfig(**kwargs))
            gen = torch.Generator().manual_seed(1000 + i)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if "lora_" in pname:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            paths[name] = root / name
            model.save_pretrained(paths[name])
        deltas[name] = lora_deltas(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    return LoraFamily(base_dir, paths, deltas, ids)


@pytest.fixture(scope="session")
def bad_shape_adapter(lora_family: LoraFamily, tmp_path_factory) -> Path:
    """a1 with layer 0's q_proj made for a 32-wide input (as if from another base model)."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("bad") / "bad"
    path.mkdir()
    src = lora_family.adapters["a1"]
    (path / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.randn(4, 32)
    save_file(tensors, path / "adapter_model.safetensors")
    return path


@pytest.fixture(scope="session")
def renamed_adapters(lora_family: LoraFamily, tmp_path_factory) -> list[Path]:
    """Copies of a1 and a2 that name different base models in base_model_name_or_path."""
    import shutil

    root = tmp_path_factory.mktemp("renamed")
    out = []
    for name, base in (("a1", "someone/model-a"), ("a2", "someone/model-b")):
        path = root / name
        shutil.copytree(lora_family.adapters[name], path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        out.append(path)
    return out
