"""Merge-set benchmarks: ingest vs sha256, joins of 10,000-contribution states, resolve vs one-shot merge.

    python benchmarks/bench_sets.py                  # ~50M-parameter bf16 family (quick)
    python benchmarks/bench_sets.py --params 2e8 --contributions 10000 --repeat 3

1. **Ingest** (``MergeSet.add`` = read + hash + write blobs + fsync + one
   transaction) of one fine-tune, against the raw sha256 of the same
   safetensors bytes (read + hash), page cache warm. Also a second add of
   the same bytes (every blob already stored: hash only).
2. **Join** of two states with N contributions each (disjoint, 10% of the
   second tombstoned): the pure OR-Set union, parsing a state from JSON, and
   the store's validated, transactional join (N new into an empty replica,
   N more on top, then the same state again: idempotent).
3. **Resolve vs one-shot merge** of the same inputs (ties, density 0.5, in the
   set's canonical order so the bytes can be compared): the set layer's
   overhead in percent (target: under 2%).

Prints a table and writes ``benchmarks/results/sets.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, print_table, write_json  # noqa: E402
from synth import build_family, config_for  # noqa: E402


def _read_all(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    return total


def _sha256_files(paths: list[Path]) -> tuple[float, int]:
    started = time.perf_counter()
    total = 0
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
                total += len(chunk)
    return time.perf_counter() - started, total


def bench_ingest(fam: Any, work: Path, repeat: int) -> dict[str, Any]:
    from convergent.store import Store

    ft = fam.finetunes[0]
    files = sorted(ft.glob("*.safetensors"))
    _read_all(files)  # warm the page cache
    raw = min(_sha256_files(files)[0] for _ in range(repeat))
    nbytes = sum(p.stat().st_size for p in files)
    fresh, dedup = [], []
    for r in range(repeat):
        root = work / f"ingest-{r}"
        shutil.rmtree(root, ignore_errors=True)
        with Store.open(root) as store:
            mset = store.create_set("bench", "ties", fam.base, params={"density": 0.5})
            t = time.perf_counter()
            mset.add(ft)
            fresh.append(time.perf_counter() - t)
            t = time.perf_counter()
            mset.add(ft, meta={"again": True})
            dedup.append(time.perf_counter() - t)
        shutil.rmtree(root, ignore_errors=True)
    return {
        "bytes": nbytes,
        "sha256_s": raw,
        "ingest_s": min(fresh),
        "ingest_dedup_s": min(dedup),
        "sha256_MBps": nbytes / raw / 1e6,
        "ingest_MBps": nbytes / min(fresh) / 1e6,
        "ingest_dedup_MBps": nbytes / min(dedup) / 1e6,
        "ingest_vs_sha256": min(fresh) / raw,
        "dedup_vs_sha256": min(dedup) / raw,
    }


class _Tiny:
    label = "tiny"

    def __init__(self) -> None:
        import torch

        self.t = torch.zeros(4)

    def names(self) -> list[str]:
        return ["w"]

    def info(self, name: str) -> Any:
        from convergent.checkpoint.source import TensorInfo

        return TensorInfo(self.t.dtype, (4,))

    def read(self, name: str, rows: Any = None, out: Any = None) -> Any:
        return self.t


def bench_join(work: Path, n: int) -> dict[str, Any]:
    from convergent.sets.model import AddTag, Contribution, SetState
    from convergent.sets.orset import ORSet, join, new_tag
    from convergent.store import Store

    root = work / "join"
    shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"contributions_per_state": n}
    with Store.open(root / "a") as a, Store.open(root / "b") as b:
        ma = a.create_set("bench", "linear", _Tiny())
        mb = b.create_set("bench", "linear", _Tiny())
        mid = ma.genesis.base

        def state(offset: int, tombstone_every: int | None) -> SetState:
            contribs = [Contribution(set=ma.id, manifest=mid, meta={"i": offset + i}) for i in range(n)]
            adds = [AddTag(contribution=c.id, tag=new_tag()) for c in contribs]
            removes = adds[::tombstone_every] if tombstone_every else []
            return SetState(set_id=ma.id, genesis=ma.genesis, contributions=contribs, adds=adds, removes=removes)

        t = time.perf_counter()
        s1, s2 = state(0, None), state(n, 10)
        out["build_two_states_s"] = time.perf_counter() - t
        o1 = ORSet(frozenset(x.key() for x in s1.adds), frozenset(x.key() for x in s1.removes))
        o2 = ORSet(frozenset(x.key() for x in s2.adds), frozenset(x.key() for x in s2.removes))
        t = time.perf_counter()
        joined = join(o1, o2)
        live = joined.live()
        out["pure_join_s"] = time.perf_counter() - t
        out["pure_live"] = len(live)
        data = s2.to_json()
        out["state_json_bytes"] = len(data)
        t = time.perf_counter()
        SetState.from_json(data)
        out["parse_state_s"] = time.perf_counter() - t
        t = time.perf_counter()
        r1 = mb.join(s1)
        out["store_join_first_s"] = time.perf_counter() - t
        t = time.perf_counter()
        r2 = mb.join(s2)
        out["store_join_second_s"] = time.perf_counter() - t
        t = time.perf_counter()
        r3 = mb.join(s2)
        out["store_join_again_s"] = time.perf_counter() - t
        t = time.perf_counter()
        full = mb.state()
        out["store_state_s"] = time.perf_counter() - t
        t = time.perf_counter()
        assert full.root == mb.root
        out["root_from_state_s"] = time.perf_counter() - t
        out["live_after"] = len(mb.live())
        assert out["live_after"] == len(live), (out["live_after"], len(live))
        assert r1.new_adds == n and r2.new_adds == n and not r3.changed
    shutil.rmtree(root, ignore_errors=True)
    return out


def bench_resolve(fam: Any, work: Path, repeat: int, threads: int) -> dict[str, Any]:
    from convergent.engine import run_merge
    from convergent.recipe import build_job
    from convergent.recipe.schema import Recipe
    from convergent.sets.resolve import build_job as set_job
    from convergent.store import Store

    root = work / "resolve"
    shutil.rmtree(root, ignore_errors=True)
    store = Store.open(root / "store")
    mset = store.create_set("bench", "ties", fam.base, params={"density": 0.5}, dtype=fam.cfg.dtype)
    by_id = {mset.add(p): p for p in fam.finetunes}
    ordered = [by_id[c] for c in mset.live()]  # the set's canonical order
    recipe = Recipe.model_validate(
        {
            "merge_method": "ties",
            "base_model": str(fam.base),
            "dtype": "float32",
            "out_dtype": fam.cfg.dtype,
            "parameters": {"density": 0.5},
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in ordered],
        }
    )
    _read_all([f for m in [fam.base, *ordered] for f in sorted(m.glob("*.safetensors"))])
    _read_all([p for p in (root / "store" / "blobs").rglob("*") if p.is_file()])
    one, res, plan, one_cpu, res_cpu = [], [], [], [], []
    for r in range(repeat):
        job = build_job(recipe, root / f"oneshot-{r}", threads=threads, overwrite=True)
        t, c = time.perf_counter(), time.process_time()
        run_merge(job)
        one.append(time.perf_counter() - t)
        one_cpu.append(time.process_time() - c)
        t = time.perf_counter()
        set_job(mset, root / "plan-only", threads=threads)
        plan.append(time.perf_counter() - t)
        t, c = time.perf_counter(), time.process_time()
        mset.resolve(root / f"set-{r}", threads=threads, use_cache=False, overwrite=True)
        res.append(time.perf_counter() - t)
        res_cpu.append(time.process_time() - c)
    a = root / "oneshot-0" / "model.safetensors"
    b = root / "set-0" / "model.safetensors"
    same = a.exists() and b.exists() and a.read_bytes() == b.read_bytes()
    t = time.perf_counter()
    cached = mset.resolve(root / "set-0")
    cached_s = time.perf_counter() - t
    store.close()
    shutil.rmtree(root, ignore_errors=True)
    return {
        "oneshot_s": min(one),
        "resolve_s": min(res),
        "overhead_pct": 100 * (min(res) - min(one)) / min(one),
        "set_job_build_s": min(plan),
        "set_job_build_pct": 100 * min(plan) / min(one),
        "identical_model_bytes": same,
        "cached_resolve_s": cached_s,
        "cached": cached.cached,
        "oneshot_runs_s": one,
        "resolve_runs_s": res,
        "threads": threads,
        "oneshot_cpu_s": min(one_cpu),
        "resolve_cpu_s": min(res_cpu),
        "overhead_cpu_pct": 100 * (min(res_cpu) - min(one_cpu)) / min(one_cpu),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=5e7, help="parameters per synthetic model")
    ap.add_argument("--models", type=int, default=3, help="fine-tunes")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--contributions", type=int, default=10_000, help="contributions per state in the join bench")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--only", default="ingest,join,resolve", help="comma-separated parts to run")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    work = args.workdir / "sets"
    work.mkdir(parents=True, exist_ok=True)
    cfg = config_for(args.params, models=args.models, dtype=args.dtype)
    fam = build_family(args.workdir, cfg)
    ingest = joins = resolve = None
    if "ingest" in parts:
        print("ingest ...", flush=True)
        ingest = bench_ingest(fam, work, args.repeat)
    if "join" in parts:
        print("join ...", flush=True)
        joins = bench_join(work, args.contributions)
    if "resolve" in parts:
        print("resolve ...", flush=True)
        resolve = bench_resolve(fam, work, args.repeat, args.threads)
    rows: list[list[Any]] = []
    if ingest:
        rows += _ingest_rows(ingest)
    if joins:
        rows += _join_rows(joins, args.contributions)
    if resolve:
        rows += _resolve_rows(resolve)
    print_table(
        f"merge sets ({cfg.layers} layers, {fam.manifest['parameters']:,} params/model, {args.dtype})",
        ["area", "what", "time", "note"],
        rows,
    )
    path = write_json(
        "sets.json",
        {
            "config": vars(args) | {"workdir": str(args.workdir)},
            "machine": machine_info(args.workdir),
            "parameters_per_model": fam.manifest["parameters"],
            "ingest": ingest,
            "join": joins,
            "resolve": resolve,
        },
    )
    print(f"wrote {path}")


def _ingest_rows(ingest: dict[str, Any]) -> list[list[Any]]:
    mbytes = ingest["bytes"] / 1e6
    return [
        [
            "ingest",
            f"sha256 of {mbytes:.0f} MB (read+hash)",
            f"{ingest['sha256_s']:.3f} s",
            f"{ingest['sha256_MBps']:.0f} MB/s",
        ],
        [
            "ingest",
            "add (hash+write+fsync+commit)",
            f"{ingest['ingest_s']:.3f} s",
            f"{ingest['ingest_MBps']:.0f} MB/s = {ingest['ingest_vs_sha256']:.2f}x sha256",
        ],
        [
            "ingest",
            "add again (all blobs present)",
            f"{ingest['ingest_dedup_s']:.3f} s",
            f"{ingest['ingest_dedup_MBps']:.0f} MB/s = {ingest['dedup_vs_sha256']:.2f}x sha256",
        ],
    ]


def _join_rows(joins: dict[str, Any], n: int) -> list[list[Any]]:
    args_contributions = n
    return [
        [
            "join",
            f"pure OR-Set union, 2 x {args_contributions}",
            f"{joins['pure_join_s']:.3f} s",
            f"{joins['pure_live']} live",
        ],
        ["join", f"parse a {joins['state_json_bytes'] / 1e6:.1f} MB state", f"{joins['parse_state_s']:.3f} s", ""],
        [
            "join",
            f"store: {args_contributions} new into empty",
            f"{joins['store_join_first_s']:.3f} s",
            "validated, 1 transaction",
        ],
        [
            "join",
            f"store: {args_contributions} more on top",
            f"{joins['store_join_second_s']:.3f} s",
            f"{joins['live_after']} live",
        ],
        ["join", "store: same state again", f"{joins['store_join_again_s']:.3f} s", "idempotent, no change"],
        ["join", "store: read full state", f"{joins['store_state_s']:.3f} s", ""],
    ]


def _resolve_rows(resolve: dict[str, Any]) -> list[list[Any]]:
    return [
        ["resolve", "one-shot merge (ties, recipe)", f"{resolve['oneshot_s']:.3f} s", ""],
        [
            "resolve",
            "set resolve (same inputs, same order)",
            f"{resolve['resolve_s']:.3f} s",
            f"{resolve['overhead_pct']:+.1f}% vs one-shot; bytes identical: {resolve['identical_model_bytes']}",
        ],
        [
            "resolve",
            "CPU time: one-shot / resolve",
            f"{resolve['oneshot_cpu_s']:.2f} / {resolve['resolve_cpu_s']:.2f} s",
            f"{resolve['overhead_cpu_pct']:+.1f}% CPU",
        ],
        [
            "resolve",
            "set layer alone (job from the store)",
            f"{resolve['set_job_build_s']:.4f} s",
            f"{resolve['set_job_build_pct']:.2f}% of a merge",
        ],
        ["resolve", "resolve again (cached by root)", f"{resolve['cached_resolve_s']:.3f} s", ""],
    ]


if __name__ == "__main__":
    main()
