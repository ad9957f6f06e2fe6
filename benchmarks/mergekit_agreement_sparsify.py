"""Agreement of convergent's task-arithmetic family with mergekit 0.1.5 itself.

Runs the same float32 inputs through mergekit's own merge methods (in the
interpreter given by --mergekit-python, default /opt/mkvenv/bin/python, which
must import mergekit; tensors are exchanged as .safetensors files) and through
``convergent.strategies.merge_tensors``, then prints, per method and case:

* deterministic methods (task_arithmetic, ties, breadcrumbs, breadcrumbs_ties,
  sce): the max abs difference of the outputs, the number of elements that
  differ by more than float32 rounding, and how many of those are NOT at a
  tied selection boundary. mergekit keeps exactly k elements and picks among
  equal magnitudes in ``argsort`` order (unspecified); convergent keeps every
  element tied with the threshold. Input sets: "1d", "2d", "big" (> 2**20
  elements, several blocks): float32 base + small deltas, so ``model - base``
  is quantized and has ties; "distinct": every |model - base| distinct (no
  ties, exact agreement expected); "bf16": models rounded to bfloat16 (heavy
  ties, as in real checkpoints).
* stochastic methods (dare_linear, dare_ties, della, della_linear): mergekit
  draws from torch's global RNG and convergent from seeded per-block draws, so
  the means over N seeds are compared; "noise" is the same statistic between
  two disjoint sets of N convergent seeds.

Usage: python benchmarks/mergekit_agreement_sparsify.py [--seeds 64] [--mergekit-python PATH]
CI does not run this (it has no mergekit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from convergent.strategies import merge_tensors

SHAPES = {"1d": (4099,), "2d": (173, 311), "big": (1100, 1000), "distinct": (1100, 1000), "bf16": (512, 768)}
STOCHASTIC_SHAPES = ("1d", "2d")
W = [0.3, 0.5, 0.7]


def per_model(**values: list[float]) -> list[dict[str, float]]:
    return [{k: v[i] for k, v in values.items()} for i in range(3)]


# (label, method, global params, per-model params)
DETERMINISTIC = [
    ("ta", "task_arithmetic", {}, per_model(weight=W)),
    ("ta normalize lambda", "task_arithmetic", {"normalize": True, "lambda": 0.8}, per_model(weight=W)),
    ("ta negative weight", "task_arithmetic", {}, per_model(weight=[1.0, -0.4, 0.6])),
    ("ties d=0.5", "ties", {}, per_model(weight=W, density=[0.5] * 3)),
    ("ties mixed d", "ties", {}, per_model(weight=W, density=[0.2, 0.5, 0.9])),
    ("ties rescale", "ties", {"rescale": True}, per_model(weight=W, density=[0.3] * 3)),
    (
        "ties no-normalize lambda int8",
        "ties",
        {"normalize": False, "lambda": 1.5, "int8_mask": True},
        per_model(weight=W, density=[0.4] * 3),
    ),
    ("ties negative weight", "ties", {}, per_model(weight=[1.0, -0.5, 0.8], density=[0.6] * 3)),
    ("ties d=1", "ties", {}, per_model(weight=[1.0] * 3, density=[1.0] * 3)),
    ("breadcrumbs", "breadcrumbs", {}, per_model(weight=W, density=[0.8] * 3, gamma=[0.05] * 3)),
    (
        "breadcrumbs mixed rescale",
        "breadcrumbs",
        {"rescale": True, "normalize": True},
        per_model(weight=W, density=[0.5, 0.7, 0.9], gamma=[0.01, 0.1, 0.2]),
    ),
    ("breadcrumbs_ties", "breadcrumbs_ties", {}, per_model(weight=W, density=[0.7] * 3, gamma=[0.02] * 3)),
    (
        "breadcrumbs_ties normalize",
        "breadcrumbs_ties",
        {"normalize": True},
        per_model(weight=W, density=[0.9, 0.6, 0.3], gamma=[0.05, 0.0, 0.3]),
    ),
    ("sce", "sce", {}, None),
    ("sce topk=0.5", "sce", {"select_topk": 0.5}, None),
    ("sce topk=0.1", "sce", {"select_topk": 0.1}, None),
]

STOCHASTIC = [
    ("dare_linear", "dare_linear", {}, per_model(weight=W, density=[0.5] * 3)),
    ("dare_linear no-rescale", "dare_linear", {"rescale": False}, per_model(weight=W, density=[0.3, 0.6, 0.9])),
    ("dare_ties", "dare_ties", {}, per_model(weight=W, density=[0.5] * 3)),
    ("dare_ties normalize", "dare_ties", {"normalize": True}, per_model(weight=W, density=[0.4, 0.6, 0.8])),
    ("della", "della", {}, per_model(weight=W, density=[0.5] * 3, epsilon=[0.2] * 3)),
    ("della_linear", "della_linear", {}, per_model(weight=W, density=[0.6] * 3, epsilon=[0.1] * 3)),
]

MERGEKIT_RUNNER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    inputs = load_file(sys.argv[1])
    jobs = json.loads(open(sys.argv[2]).read())
    out = {}
    for job in jobs:
        method = registry.get(job["method"])
        params = dict(job["params"])
        params.update(job["model_params"] or {})
        shape = job["shape"]
        tensors = [inputs[f"{shape}/base"]] + [inputs[f"{shape}/m{i}"] for i in range(3)]
        group = TensorGroup.from_tensors(tensors, base_index=0)
        if job["seeds"]:
            total = None
            for seed in range(job["seeds"]):
                torch.manual_seed(seed)
                res = method([group], parameters=params)[0].to(torch.float64)
                total = res if total is None else total + res
            out[job["key"]] = (total / job["seeds"]).to(torch.float32).contiguous()
        else:
            out[job["key"]] = method([group], parameters=params)[0].contiguous()
    save_file(out, sys.argv[3])
    """
)


def make_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    tensors = {}
    for label, shape in SHAPES.items():
        n = int(torch.tensor(shape).prod())
        if label == "distinct":
            # base in [1, 1.5); deltas = distinct multiples of 2**-22 (< 0.27): model - base is exact
            base = 1 + 0.5 * torch.rand(shape, generator=gen)
            base = (base * 2**23).round() / 2**23
            models = []
            for _ in range(3):
                steps = (torch.randperm(n, generator=gen) + 1).to(torch.float64)
                signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
                delta = (steps * signs * 2**-22).reshape(shape)
                models.append((base.to(torch.float64) + delta).to(torch.float32))
        else:
            base = torch.randn(shape, generator=gen) * (0.02 if label == "bf16" else 1.0)
            models = []
            for i in range(3):
                # task vectors of different scales with some exact zeros, like real fine-tunes
                delta = torch.randn(shape, generator=gen) * (0.002 if label == "bf16" else 0.01) * (i + 1)
                delta[torch.rand(shape, generator=gen) < 0.05] = 0
                models.append(base + delta)
            if label == "bf16":
                base = base.bfloat16().float()
                models = [m.bfloat16().float() for m in models]
        tensors[f"{label}/base"] = base
        for i, m in enumerate(models):
            tensors[f"{label}/m{i}"] = m
    return tensors


def columns(model_params: list[dict[str, float]] | None) -> dict[str, list[float]]:
    if not model_params:
        return {}
    return {k: [mp[k] for mp in model_params] for k in model_params[0]}


def ours(inputs, shape: str, method: str, params, model_params, seed: int = 0) -> torch.Tensor:
    base = inputs[f"{shape}/base"]
    models = [inputs[f"{shape}/m{i}"] for i in range(3)]
    return merge_tensors(method, models, base=base, params=params, model_params=model_params, seed=seed, chunk_rows=64)


def at_boundary(inputs, shape: str, method: str, params, model_params) -> torch.Tensor:
    """Elements where some model's selection statistic equals a selection boundary (a possible tie)."""
    base = inputs[f"{shape}/base"]
    deltas = [inputs[f"{shape}/m{i}"] - base for i in range(3)]
    mask = torch.zeros(base.shape, dtype=torch.bool)
    if method == "sce":
        topk = params.get("select_topk", 1.0)
        if topk < 1:
            var = torch.var(torch.stack(deltas), dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * topk)
            if k > 0:
                mask |= var == torch.sort(var.flatten(), descending=True).values[k - 1]
        return mask
    for delta, mp in zip(deltas, model_params or []):
        density = mp.get("density", 1.0)
        if density >= 1 or method == "task_arithmetic":
            continue
        mags = delta.abs()
        ordered = torch.sort(mags.flatten()).values
        n = ordered.numel()
        if method == "ties":
            mask |= mags == ordered[n - max(1, int(density * n))]
        else:  # breadcrumbs: both ends of the kept band
            target, n_top = int(density * n), int(mp.get("gamma", 0.01) * n)
            first = max(0, n - target - n_top)
            last = min(first + target, n) - 1
            if last >= first:
                mask |= (mags == ordered[first]) | (mags == ordered[last])
    return mask


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=64, help="seeds averaged for stochastic methods")
    ap.add_argument("--mergekit-python", default="/opt/mkvenv/bin/python")
    args = ap.parse_args()

    inputs = make_inputs()
    jobs = []
    for label, method, params, mps in DETERMINISTIC:
        for shape in SHAPES:
            job = {"key": f"{label}|{shape}", "method": method, "params": params, "model_params": columns(mps)}
            jobs.append({**job, "shape": shape, "seeds": 0})
    for label, method, params, mps in STOCHASTIC:
        for shape in STOCHASTIC_SHAPES:
            job = {"key": f"{label}|{shape}", "method": method, "params": params, "model_params": columns(mps)}
            jobs.append({**job, "shape": shape, "seeds": args.seeds})
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        paths = [tmpdir / "inputs.safetensors", tmpdir / "jobs.json", tmpdir / "out.safetensors"]
        save_file(inputs, str(paths[0]))
        paths[1].write_text(json.dumps(jobs))
        (tmpdir / "runner.py").write_text(MERGEKIT_RUNNER)
        subprocess.run([args.mergekit_python, str(tmpdir / "runner.py"), *map(str, paths)], check=True)
        theirs = load_file(str(paths[2]))

    worst: dict[str, float] = {}
    unexplained_total = 0
    print(
        f"{'deterministic: method / case':32s} {'input':8s} {'max|diff|':>10s} {'max|delta|':>10s} "
        f"{'differing':>9s} {'not-at-tie':>10s}"
    )
    for label, method, params, mps in DETERMINISTIC:
        for shape in SHAPES:
            mine = ours(inputs, shape, method, params, mps)
            ref = theirs[f"{label}|{shape}"]
            diff = (mine - ref).abs()
            scale = float((ref - inputs[f"{shape}/base"]).abs().max())
            differing = diff > 1e-6 * (1 + ref.abs())  # more than float32 rounding of the result
            unexplained = int((differing & ~at_boundary(inputs, shape, method, params, mps)).sum())
            unexplained_total += unexplained
            key = "distinct" if shape == "distinct" else "with ties"
            worst[key] = max(worst.get(key, 0.0), float(diff.max()))
            print(
                f"{label:32s} {shape:8s} {float(diff.max()):10.3e} {scale:10.3e} "
                f"{int(differing.sum()):9d} {unexplained:10d}"
            )
    print(
        f"max abs diff, tie-free inputs: {worst['distinct']:.3e}; inputs with ties: {worst['with ties']:.3e}; "
        f"elements differing away from a tied boundary: {unexplained_total}"
    )
    print()
    print(
        f"{'stochastic: mean of ' + str(args.seeds) + ' seeds':32s} {'input':8s} {'max|diff|':>10s} "
        f"{'noise':>10s} {'mean|diff|':>10s} {'mean noise':>10s}"
    )
    for label, method, params, mps in STOCHASTIC:
        for shape in STOCHASTIC_SHAPES:
            runs = [ours(inputs, shape, method, params, mps, seed=s).to(torch.float64) for s in range(2 * args.seeds)]
            mean_a = torch.stack(runs[: args.seeds]).mean(0)
            mean_b = torch.stack(runs[args.seeds :]).mean(0)
            ref = theirs[f"{label}|{shape}"].to(torch.float64)
            diff = (mean_a - ref).abs()
            noise = (mean_a - mean_b).abs()
            print(
                f"{label:32s} {shape:8s} {float(diff.max()):10.3e} {float(noise.max()):10.3e} "
                f"{float(diff.mean()):10.3e} {float(noise.mean()):10.3e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
