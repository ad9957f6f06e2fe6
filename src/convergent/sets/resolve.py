"""Resolve a merge set: its live contributions, in canonical order, through the engine.

The job is a pure function of the set's genesis and live contributions:
models sorted by contribution id, per-model parameters from each
contribution, global parameters from the genesis, the seed of every random
draw the set's Merkle root. Nothing about the replica (arrival order, store
path, thread count, time) reaches the output bytes.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convergent.errors import RecipeError, StoreError
from convergent.sets.canonical import canonical_json, sha256_hex
from convergent.sets.mergeset import PROVENANCE, ResolveResult, copy_tree_atomic, model_params_of
from convergent.sets.source import StoredCheckpoint

if TYPE_CHECKING:
    from convergent.sets.mergeset import MergeSet


def versions() -> dict[str, str]:
    """Versions of the packages whose code determines the output bytes."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("convergent", "torch", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def build_job(
    mset: MergeSet,
    out_dir: Path,
    threads: int = 2,
    memory_limit: int | None = None,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    files_dir: Path | None = None,
) -> Any:
    """The MergeJob of the set's current live contributions (see module docstring)."""
    import torch

    from convergent.engine.job import MergeJob, ModelInput, constant

    with mset.store.db.read() as c:
        from convergent.store.store import live_ids

        ids = live_ids(c, mset.id)
        root = c.execute("SELECT root FROM sets WHERE id=?", (mset.id,)).fetchone()[0]
        bodies = {cid: c.execute("SELECT body FROM contributions WHERE id=?", (cid,)).fetchone()[0] for cid in ids}
    if not ids:
        raise StoreError(f"set '{mset.name}' has no live contributions to resolve", "add one with 'convergent add'")
    from convergent.sets.model import Contribution

    strat = mset.strategy
    contribs = [Contribution.from_stored(bodies[cid]) for cid in ids]
    if len(contribs) < strat.min_models:
        raise RecipeError(
            f"merge method '{strat.name}' needs at least {strat.min_models} contributions; "
            f"set '{mset.name}' has {len(contribs)} live",
            "add more contributions",
        )
    base_manifest = mset.store.get_manifest(mset.genesis.base)
    base = StoredCheckpoint(mset.store.blobs, base_manifest, label=f"base {base_manifest.id[:12]}")
    models = []
    for cid, contrib in zip(ids, contribs):
        manifest = mset.store.get_manifest(contrib.manifest)
        src = StoredCheckpoint(mset.store.blobs, manifest, label=f"contribution {cid[:12]}")
        models.append(ModelInput(source=src, params=constant(model_params_of(strat, contrib.weight, contrib.params))))
    files: dict[str, Path] = {}
    if files_dir is not None:
        for name, digest in sorted(base_manifest.files.items()):
            path = files_dir / name
            path.write_bytes(mset.store.blobs.read_bytes(digest))
            files[name] = path
    #: Filled by ``finalize``: every output file with its sha256 (the engine's hashes + provenance).
    output_files: dict[str, str] = {}
    provenance_base = {
        "format": "convergent-provenance/1",
        "set": {"id": mset.id, "name": mset.name},
        "root": root,
        "strategy": mset.genesis.strategy,
        "params": mset.genesis.params,
        "dtype": mset.genesis.dtype,
        "base": mset.genesis.base,
        "contributions": [
            {
                "id": cid,
                "manifest": c.manifest,
                "weight": c.weight,
                "params": c.params,
                "meta": c.meta,
                "signer": c.signer,
            }
            for cid, c in zip(ids, contribs)
        ],
        "versions": versions(),
    }

    def finalize(written: dict[str, str]) -> Mapping[str, bytes]:
        doc = {**provenance_base, "files": dict(sorted(written.items()))}
        data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
        output_files.clear()
        output_files.update(written, **{PROVENANCE: sha256_hex(data)})
        return {PROVENANCE: data}

    kwargs: dict[str, Any] = {}
    if memory_limit is not None:
        kwargs["memory_limit"] = memory_limit
    job = MergeJob(
        method=mset.genesis.strategy,
        models=models,
        out_dir=out_dir,
        base=base,
        params=constant(mset.genesis.params),
        dtype=getattr(torch, mset.genesis.dtype) if mset.genesis.dtype else None,
        seed=root,
        threads=threads,
        overwrite=overwrite,
        files=files,
        finalize=finalize,
        chunk_rows=chunk_rows,
        **kwargs,
    )
    return job, root, ids, output_files


def resolve_set(
    mset: MergeSet,
    out_dir: Path,
    threads: int = 2,
    memory_limit: int | None = None,
    overwrite: bool = False,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
    chunk_rows: int | None = None,
) -> ResolveResult:
    from convergent.engine import run_merge

    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    store = mset.store
    root = mset.root
    if use_cache:
        hit = _cached(mset, root, out_dir, overwrite)
        if hit is not None:
            return ResolveResult(out_dir, mset.id, root, hit[0], hit[1], True, time.perf_counter() - started)
    files_dir = store.blobs.new_temp_path("w").with_suffix(".files")
    files_dir.mkdir(parents=True)
    try:
        job, root, ids, output_files = build_job(mset, out_dir, threads, memory_limit, overwrite, chunk_rows, files_dir)
        job.progress = progress
        result = run_merge(job)
    finally:
        shutil.rmtree(files_dir, ignore_errors=True)
    files = dict(sorted((output_files or result.files).items()))
    with store.db.write() as c:
        c.execute(
            "INSERT OR REPLACE INTO resolves(set_id, root, out_dir, files, at) VALUES (?, ?, ?, ?, ?)",
            (mset.id, root, str(out_dir), canonical_json({"files": files, "contributions": ids}).decode(), time.time()),
        )
    return ResolveResult(out_dir, mset.id, root, files, ids, False, time.perf_counter() - started)


def _verify_dir(path: Path, files: dict[str, str]) -> bool:
    from convergent.durable import sha256_file

    if not path.is_dir():
        return False
    present = {p.name for p in path.iterdir() if p.is_file()}
    if present != set(files):
        return False
    return all(sha256_file(path / name) == digest for name, digest in files.items())


def _cached(mset: MergeSet, root: str, out_dir: Path, overwrite: bool) -> tuple[dict[str, str], list[str]] | None:
    with mset.store.db.lock:
        rows = mset.store.db.conn.execute(
            "SELECT out_dir, files FROM resolves WHERE set_id=? AND root=? ORDER BY at DESC", (mset.id, root)
        ).fetchall()
    rows.sort(key=lambda r: r[0] != str(out_dir))  # the same folder first
    for where, doc in rows:
        data = json.loads(doc)
        files, ids = data["files"], data["contributions"]
        if not _verify_dir(Path(where), files):
            continue
        if Path(where) != out_dir:
            copy_tree_atomic(Path(where), out_dir, overwrite)
            with mset.store.db.write() as c:
                c.execute(
                    "INSERT OR REPLACE INTO resolves(set_id, root, out_dir, files, at) VALUES (?, ?, ?, ?, ?)",
                    (mset.id, root, str(out_dir), doc, time.time()),
                )
        return files, ids
    return None
