"""LoRA adapters: ``convergent lora merge`` and ``convergent lora fold``."""

from __future__ import annotations

from pathlib import Path

import typer

from convergent.cli.common import console, emit_json, parse_pairs, parse_size
from convergent.errors import RecipeError

lora_app = typer.Typer(
    name="lora",
    help="Merge PEFT LoRA adapters into one adapter, or fold an adapter into its base model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_METHOD_HELP = (
    "linear | task_arithmetic | ties | dare_linear | dare_ties (any registered strategy, run on delta W, "
    "then SVD to --rank) | cat (exact concatenation) | svd (weighted sum re-factorised to --rank)"
)


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"cannot read --weights '{text}'", "write them like --weights 0.5,0.5") from None


@lora_app.command("merge")
def merge(
    adapters: list[Path] = typer.Argument(..., help="PEFT adapter folders, in order"),
    out: Path = typer.Option(..., "--out", "-o", help="output adapter folder (written atomically)"),
    method: str = typer.Option("linear", help=_METHOD_HELP),
    weights: str = typer.Option(None, help="one weight per adapter, comma-separated (default 1 each)"),
    density: float = typer.Option(None, help="fraction of delta entries kept (ties, dare_*)"),
    rank: int = typer.Option(None, help="target rank (default: sum of the input ranks per module)"),
    seed: int = typer.Option(0, help="seed for stochastic methods (dare_*)"),
    param: list[str] = typer.Option(None, help="extra strategy parameter, key=value (repeatable)"),
    strict: bool = typer.Option(False, help="refuse adapters whose target modules differ"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    json_out: bool = typer.Option(False, "--json", help="print the result (files with sha256) as JSON"),
) -> None:
    """Merge LoRA adapters into one adapter that PeftModel.from_pretrained loads."""
    from convergent.lora import merge_adapters

    params = parse_pairs(param, "param")
    result = merge_adapters(
        adapters,
        out,
        method=method,
        weights=_parse_weights(weights),
        density=density,
        params=params,
        rank=rank,
        seed=seed,
        strict=strict,
        overwrite=overwrite,
        hash_files=json_out,
    )
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if json_out:
        emit_json(result.to_json())
        return
    ranks = sorted(set(result.ranks.values()))
    shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    console.print(
        f"merged {len(adapters)} adapters ({result.method}) into {result.out_dir}: "
        f"{result.modules} modules, rank {shown}, in {result.seconds:.1f}s",
        highlight=False,
    )


@lora_app.command("fold")
def fold(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder"),
    base: Path = typer.Option(..., "--base", help="the base model folder the adapter was trained on"),
    out: Path = typer.Option(..., "--out", "-o", help="output model folder (written atomically)"),
    max_shard_size: str = typer.Option("5GB", help="largest output shard"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    json_out: bool = typer.Option(False, "--json", help="print the result (files with sha256) as JSON"),
) -> None:
    """Fold an adapter into its base model (W + scale B A) as a full model folder."""
    from convergent.lora import fold_adapter

    result = fold_adapter(
        adapter, base, out, overwrite=overwrite, max_shard_size=parse_size(max_shard_size), hash_files=json_out
    )
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if json_out:
        emit_json(result.to_json())
        return
    console.print(
        f"folded {result.folded} modules into {result.tensors} tensors at {result.out_dir} in {result.seconds:.1f}s",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add the ``lora`` command group to ``app``."""
    app.add_typer(lora_app, name="lora")
