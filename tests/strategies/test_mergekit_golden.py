"""convergent agrees with mergekit 0.1.5's own outputs (recorded by benchmarks/make_mergekit_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from convergent.strategies import merge_tensors

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "mergekit"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]
INPUTS = load_file(FIXTURES / "inputs.safetensors")
OUTPUTS = load_file(FIXTURES / "outputs.safetensors")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
@pytest.mark.parametrize("shape", ["2d", "1d"])
def test_matches_mergekit(case, shape):
    base = INPUTS[f"{shape}/base"] if case["base"] else None
    models = [INPUTS[f"{shape}/m{i}"] for i in range(case["n"])]
    per_model = [{k: v[i] for k, v in case["model_params"].items()} for i in range(case["n"])]
    ours = merge_tensors(case["method"], models, base=base, params=case["params"], model_params=per_model)
    theirs = OUTPUTS[f"{case['id']}/{shape}"]
    assert ours.shape == theirs.shape
    # float32 rounding: mergekit sums in float32 where convergent uses float64 for statistics.
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6)
    # and the merge is not trivially one of its inputs (the case really exercises the method)
    assert not any(torch.equal(ours, m) for m in models[1:])
