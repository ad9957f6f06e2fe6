from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

TARGET = [0.2, 0.7, 0.45]


@pytest.fixture()
def unit_recipe(tmp_path) -> Path:
    """task_arithmetic over a zero base and three one-hot models: the merged 'w' is the weight vector."""
    save_file({"w": torch.zeros(3), "b": torch.ones(2)}, str(tmp_path / "base.safetensors"))
    models = []
    for i in range(3):
        w = torch.zeros(3)
        w[i] = 1.0
        save_file({"w": w, "b": torch.ones(2)}, str(tmp_path / f"m{i}.safetensors"))
        models.append({"model": f"m{i}.safetensors", "parameters": {"weight": 0.5}})
    recipe = {"merge_method": "task_arithmetic", "base_model": "base.safetensors", "models": models}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def merged_w(model_dir) -> torch.Tensor:
    from convergent.checkpoint import open_checkpoint

    return open_checkpoint(model_dir).read("w")


def distance_score(model_dir) -> float:
    """-||w - w*||: the synthetic evaluation."""
    return -float(torch.linalg.vector_norm(merged_w(model_dir) - torch.tensor(TARGET)))
