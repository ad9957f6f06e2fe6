"""Data-driven merging: ``stats``, ``search``, ``adamerge``, ``fw-merge`` and ``surgery``."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from convergent.cli.common import console, emit_json, parse_size, progress_bar


def stats(
    checkpoint: Path = typer.Argument(..., help="transformers model folder (config.json, weights, tokenizer)"),
    data: Path = typer.Option(..., "--data", help="examples: a text file (one per line) or JSONL with a 'text' field"),
    kind: str = typer.Option(..., "--kind", help="fisher (diagonal Fisher) or gram (linear-layer input Grams)"),
    out: Path = typer.Option(None, "--out", help="output .safetensors (default ./<model>.<kind>.safetensors)"),
    max_samples: int = typer.Option(None, "--max-samples", help="use at most N examples"),
    batch_size: int = typer.Option(8, "--batch-size", help="examples per forward pass (gram)"),
    max_length: int = typer.Option(512, "--max-length", help="truncate examples to N tokens"),
    target: str = typer.Option("auto", "--target", help="fisher: lm (next-token loss), predicted (own label), auto"),
    overwrite: bool = typer.Option(False, help="replace an existing output file"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Compute Fisher or Gram statistics of CHECKPOINT on your data, for fisher/regmean merges."""
    from convergent.stats import compute_statistics, save_statistics

    kind = kind.lower()
    dest = out or Path(f"{checkpoint.resolve().name}.{kind}.safetensors")
    if dest.exists() and not overwrite:
        from convergent.errors import OutputError

        raise OutputError(f"{dest} already exists", "choose another --out or pass --overwrite")
    with progress_bar(f"{kind} statistics", 1, enabled=not quiet and not json_out) as update:
        result = compute_statistics(
            checkpoint,
            data,
            kind,
            max_samples=max_samples,
            max_length=max_length,
            batch_size=batch_size,
            target=target,
            progress=update,
        )
    save_statistics(result, dest, overwrite=overwrite)
    summary = {
        "out": str(dest),
        "kind": result.kind,
        "samples": result.samples,
        "tokens": result.tokens,
        "tensors": len(result.tensors),
        "metadata": result.metadata,
    }
    if json_out:
        emit_json(summary)
    elif not quiet:
        console.print(
            f"wrote {result.kind} statistics for {len(result.tensors)} tensors ({result.samples} examples, "
            f"{result.tokens} tokens) to {dest}"
        )


def search(
    recipe: Path = typer.Argument(..., help="mergekit-style YAML recipe whose coefficients are searched"),
    eval_fn: str = typer.Option(None, "--eval", help="Python evaluation 'module:function' (or file.py:function)"),
    eval_cmd: str = typer.Option(None, "--eval-cmd", help="shell command printing a score; {model} = merged folder"),
    method: str = typer.Option("cmaes", "--method", help="cmaes or genetic"),
    budget: int = typer.Option(50, "--budget", help="total number of candidate merges to evaluate"),
    seed: int = typer.Option(0, "--seed", help="seed of the search (and of stochastic merge methods)"),
    state: Path = typer.Option(None, "--state", help="JSON state file: saved after every evaluation, resumed from"),
    out: Path = typer.Option(None, "--out", help="write the best merge here (with recipe.yaml)"),
    param: list[str] = typer.Option(None, "--param", help="parameter and bounds to search, e.g. weight=0:1 (repeat)"),
    layers: int = typer.Option(1, "--layers", help="values per coefficient over depth (1 = one per model)"),
    popsize: int = typer.Option(None, "--popsize", help="population size (default from the dimension)"),
    sigma: float = typer.Option(0.3, "--sigma", help="CMA-ES initial step size on the [0, 1]-scaled space"),
    timeout: float = typer.Option(None, "--timeout", help="seconds allowed per evaluation command"),
    work_dir: Path = typer.Option(None, "--work-dir", help="where candidate merges are written (default: temp)"),
    threads: int = typer.Option(min(4, os.cpu_count() or 1), help="tensors merged in parallel"),
    memory_limit: str = typer.Option("2GB", help="working-memory budget of each merge"),
    overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Search a recipe's merge coefficients (CMA-ES or genetic) against your evaluation; resumable."""
    from convergent.search.coefficients import search as run_search
    from convergent.search.evaluate import make_evaluator

    evaluator = make_evaluator(eval_fn, eval_cmd, timeout)
    with progress_bar(f"search ({method})", budget, enabled=not quiet and not json_out) as update:
        result = run_search(
            recipe,
            evaluator,
            method=method,
            budget=budget,
            seed=seed,
            params=param or None,
            layers=layers,
            state_path=state,
            out_dir=out,
            work_dir=work_dir,
            popsize=popsize,
            sigma=sigma,
            overwrite=overwrite,
            merge_options={"threads": max(1, threads), "memory_limit": parse_size(memory_limit)},
            progress=update,
        )
    if json_out:
        emit_json({"method": method, "seed": seed, "budget": budget, **result.to_json()})
    elif not quiet:
        resumed = f" (resumed after {result.resumed_from})" if result.resumed_from else ""
        console.print(f"best score {result.best_score:.6g} after {result.evaluations} evaluations{resumed}")
        for owner, values in result.best.items():
            console.print(f"  {owner}: {values}")
        if out:
            console.print(f"wrote the best merge to {out}")


def _texts(data: Path, max_samples: int | None) -> list[str]:
    from convergent.stats import load_texts

    return load_texts(data, max_samples)


def adamerge(
    models: list[Path] = typer.Argument(..., help="fine-tuned model folders"),
    base: Path = typer.Option(..., "--base", help="the base (pre-trained) model folder"),
    data: Path = typer.Option(..., "--data", help="unlabelled examples (text lines or JSONL 'text')"),
    out: Path = typer.Option(..., "--out", help="output folder for the merged model"),
    granularity: str = typer.Option("layer", help="task, layer (per numbered layer) or tensor"),
    steps: int = typer.Option(100, help="optimisation steps"),
    lr: float = typer.Option(1e-3, help="Adam learning rate"),
    init: float = typer.Option(0.3, help="initial coefficient"),
    low: float = typer.Option(0.0, help="lower bound of coefficients"),
    high: float = typer.Option(1.0, help="upper bound of coefficients"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(128, "--max-length"),
    max_samples: int = typer.Option(None, "--max-samples"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """AdaMerging: learn task-vector coefficients by entropy minimisation on unlabelled data."""
    from convergent.search.adamerging import adamerge as run

    texts = _texts(data, max_samples)
    with progress_bar("adamerging", steps, enabled=not quiet and not json_out) as update:
        result = run(
            base,
            models,
            texts,
            granularity=granularity,
            steps=steps,
            lr=lr,
            init=init,
            bounds=(low, high),
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
            out_dir=out,
            overwrite=overwrite,
            progress=update,
        )
    if json_out:
        emit_json(result.to_json())
    elif not quiet:
        console.print(
            f"entropy {result.entropy_before:.4f} -> {result.entropy_after:.4f}; "
            f"{len(result.coefficients)} coefficient group(s); wrote {out}"
        )


def fw_merge(
    models: list[Path] = typer.Argument(..., help="fine-tuned model folders"),
    base: Path = typer.Option(..., "--base", help="the base (pre-trained) model folder"),
    out: Path = typer.Option(..., "--out", help="output folder for the merged model"),
    loss: str = typer.Option(None, "--loss", help="differentiable loss 'module:function' taking the model"),
    data: Path = typer.Option(None, "--data", help="or: texts for a language-model loss (causal LMs)"),
    iterations: int = typer.Option(10, help="Frank-Wolfe iterations"),
    step_size: float = typer.Option(1.0, "--step-size", help="multiplies the 2/(t+2) step"),
    scaling: float = typer.Option(1.0, help="task vectors are scaled by this at the vertices"),
    granularity: str = typer.Option("tensor", help="tensor (per-tensor selection) or model"),
    oracle: str = typer.Option("cosine", help="cosine (paper) or inner (textbook LMO)"),
    init: str = typer.Option("base", help="start from the base or the average of the models"),
    state: Path = typer.Option(None, "--state", help="JSON state file, saved every iteration and resumed from"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(128, "--max-length"),
    max_samples: int = typer.Option(None, "--max-samples"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """FW-Merging: Frank-Wolfe selection of task vectors by the gradient of your loss."""
    from convergent.search.evaluate import load_callable
    from convergent.search.frank_wolfe import frank_wolfe_merge

    loss_fn = load_callable(loss) if loss else None
    texts = _texts(data, max_samples) if data is not None else None
    with progress_bar("frank-wolfe", iterations, enabled=not quiet and not json_out) as update:
        result = frank_wolfe_merge(
            base,
            models,
            loss_fn,
            texts,
            iterations=iterations,
            step_size=step_size,
            scaling=scaling,
            granularity=granularity,
            oracle=oracle,
            init=init,
            seed=seed,
            max_length=max_length,
            batch_size=batch_size,
            state_path=state,
            out_dir=out,
            overwrite=overwrite,
            progress=update,
        )
    if json_out:
        emit_json(result.to_json())
    elif not quiet:
        console.print(
            f"loss {result.initial_loss:.6g} -> {result.final_loss:.6g} in {result.iterations} iterations; wrote {out}"
        )


def surgery(
    merged: Path = typer.Argument(..., help="the merged model folder"),
    task: Path = typer.Option(..., "--task", help="the individual fine-tuned model of this task"),
    data: Path = typer.Option(..., "--data", help="unlabelled examples of the task"),
    out: Path = typer.Option(..., "--out", help="output .safetensors for the surgery module"),
    rank: int = typer.Option(16, help="rank of the surgery module"),
    steps: int = typer.Option(500, help="optimisation steps"),
    lr: float = typer.Option(1e-3, help="Adam learning rate"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(128, "--max-length"),
    max_samples: int = typer.Option(None, "--max-samples"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, help="replace an existing output file"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Representation surgery: fit a per-task module aligning the merged model's features with the task model's."""
    from convergent.search.surgery import fit_surgery

    texts = _texts(data, max_samples)
    with progress_bar("surgery", steps, enabled=not quiet and not json_out) as update:
        result = fit_surgery(
            merged,
            task,
            texts,
            rank=rank,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
            out=out,
            overwrite=overwrite,
            progress=update,
        )
    if json_out:
        emit_json(result.to_json())
    elif not quiet:
        console.print(f"L1 distance {result.l1_before:.4g} -> {result.l1_after:.4g}; wrote {out}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command()(stats)
    app.command()(search)
    app.command()(adamerge)
    app.command("fw-merge")(fw_merge)
    app.command()(surgery)
