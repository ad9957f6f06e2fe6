"""One-shot merges: ``merge``, ``inspect`` and ``strategies``."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.table import Table

from convergent.cli.common import console, emit_json, out, parse_size, progress_bar


@contextlib.contextmanager
def _without_cycle_collection() -> Iterator[None]:
    """Pause the cyclic garbage collector (restored after; reference counting still frees everything).

    During a merge it would only re-scan the import graphs of torch and numba
    (about 0.3 s of a 1B-parameter merge); the engine makes no garbage cycles.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@_without_cycle_collection()
def merge(
    recipe: Path = typer.Argument(..., help="mergekit-style YAML recipe"),
    out_dir: Path = typer.Argument(..., help="output folder (written atomically)"),
    threads: int = typer.Option(min(4, os.cpu_count() or 1), help="tensors merged in parallel"),
    memory_limit: str = typer.Option("2GB", help="working-memory budget, e.g. 2GB, 512MB"),
    max_shard_size: str = typer.Option("5GB", help="largest output shard"),
    seed: int = typer.Option(0, help="seed for stochastic methods (DARE, DELLA, ...)"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    allow_nonfinite: bool = typer.Option(False, help="merge inputs that contain NaN/Inf"),
    json_out: bool = typer.Option(False, "--json", help="print output files with sha256 as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Merge the checkpoints a recipe names into OUT_DIR."""
    # numpy's BLAS threads, unused by merges, would only spin beside the engine's
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from convergent.engine import run_merge
    from convergent.recipe import build_job, load_recipe

    parsed = load_recipe(recipe)
    job = build_job(
        parsed,
        out_dir,
        recipe_dir=recipe.resolve().parent,
        threads=max(1, threads),
        memory_limit=parse_size(memory_limit),
        max_shard_size=parse_size(max_shard_size),
        seed=seed,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
    )
    with progress_bar(f"merging ({parsed.merge_method})", 1, enabled=not quiet and not json_out) as update:
        job.progress = update
        result = run_merge(job, hash_outputs=json_out)
    if json_out:
        emit_json(
            {
                "out_dir": str(result.out_dir),
                "merge_method": parsed.merge_method,
                "tensors": result.tensors,
                "parameters": result.parameters,
                "seconds": round(result.seconds, 3),
                "files": result.files,
            }
        )
    elif not quiet:
        console.print(
            f"merged {result.tensors} tensors ({result.parameters:,} parameters) into {result.out_dir} "
            f"in {result.seconds:.1f}s"
        )


def inspect(
    path: Path = typer.Argument(..., help="checkpoint folder or file"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """List a checkpoint's tensors with dtypes, shapes and the parameter count."""
    from convergent.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    rows = []
    for name in ckpt.names():
        info = ckpt.info(name)
        rows.append({"name": name, "dtype": str(info.dtype).removeprefix("torch."), "shape": list(info.shape)})
    total = sum(ckpt.info(n).numel for n in ckpt.names())
    summary = {"path": str(path), "layout": ckpt.kind, "tensors": len(rows), "parameters": total, "bytes": ckpt.nbytes}
    if json_out:
        emit_json({**summary, "tensor_list": rows})
        return
    table = Table(title=f"{path} ({ckpt.kind})")
    for col in ("tensor", "dtype", "shape"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], row["dtype"], "x".join(map(str, row["shape"])) or "scalar")
    out.print(table)
    out.print(f"{len(rows)} tensors, {total:,} parameters, {ckpt.nbytes / 1e6:.1f} MB")


#: Methods that are whole procedures over models and data, not per-tensor strategies.
PROCEDURES = [
    ("ada_merging", "convergent adamerge", "Yang et al. 2023, AdaMerging (arXiv:2310.02575)"),
    ("fw_merging", "convergent fw-merge", "Chen et al. 2025, Frank-Wolfe Merging (arXiv:2503.12649)"),
    ("representation_surgery", "convergent surgery", "Yang et al. 2024, Representation Surgery (arXiv:2402.02705)"),
    ("evolutionary (CMA-ES) / genetic search", "convergent search", "Akiba et al. 2024, Evolutionary model merge"),
    ("LoRA: linear/ties/dare on delta W, cat, svd", "convergent lora merge", "PEFT add_weighted_adapter semantics"),
    ("LoRA fold into base", "convergent lora fold", "Hu et al. 2021, LoRA (arXiv:2106.09685)"),
]


def strategies(
    name: str = typer.Argument(None, help="show one strategy in detail"),
    family: str = typer.Option(None, help="only this family (mergekit, task-vector, federated, ...)"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """List merge strategies with their parameters, defaults and papers."""
    from convergent.strategies import REGISTRY, get_strategy

    chosen = [get_strategy(name)] if name else [s for _, s in sorted(REGISTRY.items())]
    if family:
        chosen = [s for s in chosen if s.family == family]
    described = [s.describe() for s in chosen]
    if json_out:
        emit_json(described)
        return
    if not name:
        _print_table(described)
        procedures = Table(title="procedures (whole-model methods, run as their own commands)")
        for col in ("method", "command", "paper"):
            procedures.add_column(col, overflow="fold")
        for row in PROCEDURES:
            procedures.add_row(*row)
        out.print(procedures)
        return
    _print_detail(described[0])


def _print_detail(d: dict) -> None:
    out.print(f"[bold]{d['name']}[/bold] ({d['family']}): {d['summary']}")
    out.print(f"paper: {d['paper']}")
    out.print(f"base_model: {d['base_model']}; models: {d['min_models']}..{d['max_models'] or 'any'}")
    out.print(f"streams in chunks: {'yes' if d['streams_in_chunks'] else 'no'} ({d['memory']})")
    for title, params in (("parameters", d["parameters"]), ("per-model parameters", d["model_parameters"])):
        out.print(f"{title}:" if params else f"{title}: none")
        for p in params:
            default = "required" if p["required"] else p["default"]
            out.print(f"  {p['name']} ({p['type']}, default {default}): {p['description']}")


def _print_table(described: list[dict]) -> None:
    table = Table(title="merge strategies (convergent strategies NAME for details and papers)", show_lines=True)
    for col in ("name", "family", "base", "parameters (default)", "per-model", "streams"):
        table.add_column(col, overflow="fold")

    def fmt(params: list[dict]) -> str:
        return "\n".join(f"{p['name']}={'required' if p['required'] else p['default']}" for p in params) or "-"

    for d in described:
        table.add_row(
            d["name"],
            d["family"],
            d["base_model"],
            fmt(d["parameters"]),
            fmt(d["model_parameters"]),
            "yes" if d["streams_in_chunks"] else f"no: {d['memory']}",
        )
    out.print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command()(merge)
    app.command()(inspect)
    app.command()(strategies)
