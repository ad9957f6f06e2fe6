"""Agreement of convergent's geometric strategies with mergekit's own method code.

Runs the same inputs through ``convergent.strategies.merge_tensors`` and, in a
subprocess, through mergekit's merge methods (a Python environment where
mergekit is importable: ``--mergekit-python``, default ``$MERGEKIT_PYTHON`` or
``/opt/mkvenv/bin/python``), and reports the largest differences.

    python benchmarks/mergekit_agreement_geometric.py [--json]

mergekit runs each case twice: as mergekit runs it (float32 inputs, float32
maths) and with ``dtype=float64`` (the same code at double precision, used as
the precision reference). A case agrees when convergent is within ``--rtol`` x
max |output| of mergekit float32, or, where mergekit's own float32 rounding is
larger than that, when convergent is at least as close to mergekit float64 as
mergekit float32 is (convergent reduces in float64, so on big tensors it is
the more accurate of the two). Cases mergekit computes from an unseeded random
sample (arcee_fusion above one million elements) are compared with mergekit's
code run with that sampling switched off (exact quartiles, which is what
convergent computes); the number of elements that differ from the sampled run
is reported in ``note``. Not a pytest test: CI has no mergekit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from convergent.strategies import merge_tensors

HELPER = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from mergekit import merge_methods
from mergekit.merge_methods import arcee_fusion
from mergekit.merge_methods.base import TensorGroup

SAMPLE_SIZE = arcee_fusion._QUANTILE_SAMPLE_SIZE

jobs = json.load(open(sys.argv[1]))
tensors = load_file(sys.argv[2])
out = {}
for job in jobs:
    inputs = [tensors[name] for name in job["inputs"]]
    group = TensorGroup.from_tensors(inputs, base_index=job["base_index"])
    method = merge_methods.get(job["method"])
    variants = [("", None, False), ("@f64", torch.float64, False)]
    if job["exact"]:
        variants += [("@exact", None, True), ("@f64@exact", torch.float64, True)]
    for suffix, dtype, exact in variants:
        # exact: mergekit's own quantile code without its random subsampling
        arcee_fusion._QUANTILE_SAMPLE_SIZE = 1 << 62 if exact else SAMPLE_SIZE
        torch.manual_seed(0)
        (result,) = method([group], parameters=job["params"], dtype=dtype)
        out[job["id"] + suffix] = result.clone().contiguous()
save_file(out, sys.argv[3])
"""


@dataclass
class Case:
    id: str
    method: str
    models: list[torch.Tensor]
    base: torch.Tensor | None = None
    params: dict[str, Any] = field(default_factory=dict)
    model_params: list[dict[str, Any]] | None = None
    mk_params: dict[str, Any] = field(default_factory=dict)
    loose: str = ""


def finetunes(gen: torch.Generator, shape: tuple[int, ...], k: int, spread: float = 0.1, sparse: float = 1.0):
    base = torch.randn(shape, generator=gen) * 0.02
    models = []
    for _ in range(k):
        delta = torch.randn(shape, generator=gen) * 0.02 * spread
        if sparse < 1.0:
            delta = delta * (torch.rand(shape, generator=gen) < sparse)
        models.append(base + delta)
    return base, models


def cases() -> list[Case]:
    gen = torch.Generator().manual_seed(1234)
    shapes = {"1d": (301,), "2d": (64, 48), "3d": (12, 6, 10), "big": (1100, 1000)}
    out: list[Case] = []
    for sname, shape in shapes.items():
        base, ft = finetunes(gen, shape, 3)
        rand = [torch.randn(shape, generator=gen) for _ in range(3)]
        for t in (0.0, 0.3, 0.5, 1.0):
            out.append(Case(f"slerp/{sname}/t{t}", "slerp", [ft[0]], base, {"t": t}, mk_params={"t": t}))
        out.append(Case(f"slerp/{sname}/random", "slerp", [rand[1]], rand[0], {"t": 0.35}, mk_params={"t": 0.35}))
        out.append(Case(f"slerp/{sname}/parallel", "slerp", [rand[0] * 2.5], rand[0], {"t": 0.7}, mk_params={"t": 0.7}))
        for flatten in (True, False):
            for row_wise in (False, True):
                if flatten and row_wise:
                    continue
                p = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
                w = [{"weight": 0.7}, {"weight": 0.4}]
                mk = {**p, "weight": [0.7, 0.4]}
                tag = f"{'flat' if flatten else 'rows' if not row_wise else 'cols'}"
                out.append(Case(f"nuslerp/{sname}/{tag}/base", "nuslerp", ft[:2], base, p, w, mk))
                out.append(Case(f"nuslerp/{sname}/{tag}/nobase", "nuslerp", rand[:2], None, p, w, mk))
        w3 = [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.9}]
        mk3 = {"weight": [0.5, 0.3, 0.9]}
        out.append(Case(f"multislerp/{sname}/base", "multislerp", ft, base, {}, w3, mk3))
        out.append(Case(f"multislerp/{sname}/nobase", "multislerp", rand, None, {}, w3, mk3))
        out.append(
            Case(
                f"multislerp/{sname}/unnormalized",
                "multislerp",
                rand[:2],
                None,
                {"normalize_weights": False},
                w3[:2],
                {"normalize_weights": False, "weight": [0.5, 0.3]},
            )
        )
        out.append(Case(f"multislerp/{sname}/one", "multislerp", rand[:1], base, {}, w3[:1], {"weight": [0.5]}))
        out.append(Case(f"karcher/{sname}/random", "karcher", rand, None))
        out.append(Case(f"karcher/{sname}/finetunes", "karcher", ft, None))
        out.append(
            Case(f"karcher/{sname}/iter3", "karcher", rand[:2], None, {"max_iter": 3}, mk_params={"max_iter": 3})
        )
        for fw in (False, True):
            p = {"filter_wise": fw}
            out.append(Case(f"model_stock/{sname}/fw{int(fw)}", "model_stock", ft, base, p, mk_params=p))
            out.append(Case(f"model_stock/{sname}/fw{int(fw)}/two", "model_stock", ft[:2], base, p, mk_params=p))
        for t in (1e-4, 0.001, 0.01, 10.0):
            out.append(Case(f"nearswap/{sname}/t{t}", "nearswap", [ft[0]], base, {"t": t}, mk_params={"t": t}))
        out.append(Case(f"passthrough/{sname}", "passthrough", [rand[0]]))
        out.append(
            Case(
                f"passthrough/{sname}/scale",
                "passthrough",
                [rand[0]],
                model_params=[{"scale": 0.37}],
                mk_params={"scale": [0.37]},
            )
        )
        loose = "mergekit samples 1e6 quartile values (unseeded)" if sname == "big" else ""
        out.append(Case(f"arcee_fusion/{sname}/finetune", "arcee_fusion", [ft[0]], base, loose=loose))
        out.append(Case(f"arcee_fusion/{sname}/random", "arcee_fusion", [rand[1]], rand[0], loose=loose))
        sbase, sparse = finetunes(gen, shape, 3, spread=1.0, sparse=0.3)
        out.append(Case(f"ram/{sname}", "ram", sparse, sbase))
        out.append(Case(f"ram/{sname}/eps", "ram", sparse, sbase, {"epsilon": 1e-3}, mk_params={"epsilon": 1e-3}))
        out.append(Case(f"ramplus_tl/{sname}", "ramplus_tl", sparse, sbase))
        p = {"r": 0.5, "alpha": 0.9, "epsilon": 1e-4}
        out.append(Case(f"ramplus_tl/{sname}/params", "ramplus_tl", sparse, sbase, p, mk_params=p))
        out.append(Case(f"ramplus_tl/{sname}/two", "ramplus_tl", sparse[:2], sbase))
    # a 1-D tensor of more than one block: whole-vector softmax / norms across blocks
    base, ft = finetunes(gen, (1_200_000,), 2)
    loose = "mergekit samples 1e6 quartile values (unseeded)"
    out.append(Case("arcee_fusion/big1d/finetune", "arcee_fusion", [ft[0]], base, loose=loose))
    p = {"nuslerp_flatten": False}
    out.append(Case("nuslerp/big1d/rows", "nuslerp", ft, base, p, mk_params={**p, "weight": [1.0, 1.0]}))
    out.append(
        Case("model_stock/big1d/fw1", "model_stock", ft, base, {"filter_wise": True}, mk_params={"filter_wise": True})
    )
    return out


def run_mergekit(python: str, all_cases: list[Case], workdir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    stored: dict[int, str] = {}  # each distinct tensor once
    jobs = []
    for case in all_cases:
        names = []
        inputs = ([case.base] if case.base is not None else []) + case.models
        for t in inputs:
            if id(t) not in stored:
                stored[id(t)] = f"t{len(stored)}"
                tensors[stored[id(t)]] = t.clone().contiguous()
            names.append(stored[id(t)])
        jobs.append(
            {
                "id": case.id,
                "method": case.method,
                "inputs": names,
                "base_index": 0 if case.base is not None else None,
                "params": case.mk_params,
                "exact": bool(case.loose),
            }
        )
    (workdir / "jobs.json").write_text(json.dumps(jobs))
    save_file(tensors, str(workdir / "in.safetensors"))
    (workdir / "helper.py").write_text(HELPER)
    subprocess.run(
        [
            python,
            str(workdir / "helper.py"),
            str(workdir / "jobs.json"),
            str(workdir / "in.safetensors"),
            str(workdir / "out.safetensors"),
        ],
        check=True,
    )
    return load_file(str(workdir / "out.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-python", default=os.environ.get("MERGEKIT_PYTHON", "/opt/mkvenv/bin/python"))
    ap.add_argument("--rtol", type=float, default=2e-6)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    all_cases = cases()
    with tempfile.TemporaryDirectory() as tmp:
        ref = run_mergekit(args.mergekit_python, all_cases, Path(tmp))
    rows = []
    ok = True
    for case in all_cases:
        got = merge_tensors(
            case.method, case.models, base=case.base, params=case.params, model_params=case.model_params
        ).double()
        exact = "@exact" if case.loose else ""
        mk32 = ref[case.id + exact].double()
        mk64 = ref[case.id + "@f64" + exact]
        scale = max(float(mk64.abs().max()), 1e-30) if mk64.numel() else 1.0

        def worst(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a - b).abs().max()) if a.numel() else 0.0

        d32, d64, mk_err = worst(got, mk32), worst(got, mk64), worst(mk32, mk64)
        differing = int(((got - mk32).abs() > args.rtol * scale).sum())
        passed = d32 <= args.rtol * scale or d64 <= max(mk_err, args.rtol * scale)
        note = ""
        if case.loose:
            sampled = int(((got - ref[case.id].double()).abs() > args.rtol * scale).sum())
            note = f"{case.loose}: compared with sampling off; {sampled} elements differ from sampled mergekit"
        ok &= passed
        rows.append(
            {
                "case": case.id,
                "max_abs_diff_vs_mergekit": d32,
                "rel_diff_vs_mergekit": d32 / scale,
                "rel_diff_vs_mergekit_f64": d64 / scale,
                "rel_err_mergekit_f32_vs_f64": mk_err / scale,
                "elements_beyond_rtol": differing,
                "numel": got.numel(),
                "ok": passed,
                "note": note,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'case':36} {'max|d mk|':>10} {'rel mk':>9} {'rel mk64':>9} {'mk32 err':>9} {'beyond':>7}  ok")
        for r in rows:
            print(
                f"{r['case']:36} {r['max_abs_diff_vs_mergekit']:10.3g} {r['rel_diff_vs_mergekit']:9.3g}"
                f" {r['rel_diff_vs_mergekit_f64']:9.3g} {r['rel_err_mergekit_f32_vs_f64']:9.3g}"
                f" {r['elements_beyond_rtol']:7d}  {'yes' if r['ok'] else 'NO'} {r['note']}"
            )
        by_method: dict[str, list[float]] = {}
        for r in rows:
            worst = by_method.setdefault(r["case"].split("/")[0], [0.0, 0.0, 0.0])
            worst[0] = max(worst[0], r["max_abs_diff_vs_mergekit"])
            worst[1] = max(worst[1], r["rel_diff_vs_mergekit"])
            worst[2] = max(worst[2], r["rel_diff_vs_mergekit_f64"])
        print("\nworst per method: max|diff| and relative diff vs mergekit f32, relative diff vs mergekit f64")
        for m, (a, b, c) in by_method.items():
            print(f"  {m:14} {a:10.3g} {b:10.3g} {c:10.3g}")
        print("\nALL AGREE" if ok else "\nDISAGREEMENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
