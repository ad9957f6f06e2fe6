"""Record mergekit's own outputs as test fixtures (run where mergekit is installed).

CI has no mergekit, so ``tests/strategies/test_mergekit_golden.py`` compares
convergent against outputs that mergekit 0.1.5 itself computed on the same
inputs, stored in ``tests/fixtures/mergekit/``. This script regenerates them:

    python benchmarks/make_mergekit_golden.py [--mergekit-python /opt/mkvenv/bin/python]

Only deterministic methods are recorded (DARE/DELLA draw from torch's global
RNG in mergekit; their statistics are checked in the strategy tests).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mergekit"
SHAPES = {"2d": (37, 53), "1d": (61,)}
W = [0.3, 0.5, 0.7]

# (case id, method, uses base, number of models, global params, per-model params by name)
CASES: list[tuple[str, str, bool, int, dict, dict]] = [
    ("linear", "linear", False, 3, {}, {"weight": W}),
    ("linear-nonorm", "linear", False, 3, {"normalize": False}, {"weight": W}),
    ("task_arithmetic", "task_arithmetic", True, 3, {}, {"weight": W}),
    ("task_arithmetic-lambda", "task_arithmetic", True, 3, {"lambda": 0.8, "normalize": True}, {"weight": W}),
    ("ties", "ties", True, 3, {}, {"weight": W, "density": [0.5] * 3}),
    ("ties-mixed", "ties", True, 3, {"normalize": False, "lambda": 1.3}, {"weight": W, "density": [0.2, 0.5, 0.9]}),
    ("breadcrumbs", "breadcrumbs", True, 3, {}, {"weight": W, "density": [0.8] * 3, "gamma": [0.05] * 3}),
    ("breadcrumbs_ties", "breadcrumbs_ties", True, 3, {}, {"weight": W, "density": [0.7] * 3, "gamma": [0.02] * 3}),
    ("sce", "sce", True, 3, {"select_topk": 0.5}, {}),
    ("slerp", "slerp", True, 1, {"t": 0.3}, {}),
    ("nuslerp", "nuslerp", False, 2, {}, {"weight": [0.4, 0.6]}),
    ("nuslerp-rowwise", "nuslerp", False, 2, {"nuslerp_row_wise": True}, {"weight": [0.7, 0.3]}),
    ("multislerp", "multislerp", False, 3, {}, {"weight": W}),
    ("karcher", "karcher", False, 3, {}, {}),
    ("model_stock", "model_stock", True, 3, {}, {}),
    ("nearswap", "nearswap", True, 1, {"t": 0.01}, {}),
    ("ram", "ram", True, 3, {}, {}),
    ("ramplus_tl", "ramplus_tl", True, 3, {}, {}),
]

RUNNER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    tensors = load_file(sys.argv[1])
    out = {}
    for case in json.load(open(sys.argv[2])):
        for shape in case["shapes"]:
            names = ([f"{shape}/base"] if case["base"] else []) + [f"{shape}/m{i}" for i in range(case["n"])]
            group = TensorGroup.from_tensors([tensors[n] for n in names], base_index=0 if case["base"] else None)
            params = dict(case["params"])
            params.update(case["model_params"])
            torch.manual_seed(0)
            (result,) = merge_methods.get(case["method"])([group], parameters=params)
            out[f"{case['id']}/{shape}"] = result.to(torch.float32).contiguous()
    save_file(out, sys.argv[3])
    """
)


def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2026)
    tensors = {}
    for label, shape in SHAPES.items():
        base = torch.randn(shape, generator=gen)
        tensors[f"{label}/base"] = base
        for i in range(3):
            tensors[f"{label}/m{i}"] = base + torch.randn(shape, generator=gen) * 0.1 * (i + 1)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-python", default="/opt/mkvenv/bin/python")
    args = parser.parse_args()
    data = inputs()
    cases = [
        {"id": cid, "method": m, "base": b, "n": n, "params": p, "model_params": mp, "shapes": list(SHAPES)}
        for cid, m, b, n, p, mp in CASES
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        save_file(data, tmpdir / "in.safetensors")
        (tmpdir / "cases.json").write_text(json.dumps(cases))
        (tmpdir / "runner.py").write_text(RUNNER)
        subprocess.run(
            [
                args.mergekit_python,
                tmpdir / "runner.py",
                tmpdir / "in.safetensors",
                tmpdir / "cases.json",
                tmpdir / "out.safetensors",
            ],
            check=True,
        )
        outputs = load_file(tmpdir / "out.safetensors")
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(data, OUT / "inputs.safetensors")
    save_file(outputs, OUT / "outputs.safetensors")
    version = subprocess.run(
        [args.mergekit_python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (OUT / "cases.json").write_text(json.dumps({"mergekit": version, "cases": cases}, indent=1) + "\n")
    print(f"wrote {len(outputs)} mergekit {version} outputs to {OUT}")


if __name__ == "__main__":
    main()
