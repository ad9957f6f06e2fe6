"""``convergent demo``: the merge-set idea end to end, on the embedded store, in seconds.

Builds a tiny Llama-shaped model with transformers (random init, seeded;
nothing downloaded) and three fine-tunes (seeded perturbations); three local
replicas add contributions in different orders, exchange bundles, and resolve
to the same bytes; then a remove on one replica, shipped as a delta bundle,
gives exactly the bytes of a replica that never had that contribution.
Finally the merged model is loaded with transformers and run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from convergent.cli.common import console, emit_json, out


def _quiet_transformers() -> None:
    import logging

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _build_models(models_dir: Path) -> tuple[Path, list[Path]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    base = models_dir / "base"
    model.save_pretrained(base, safe_serialization=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tunes = []
    for i in range(3):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                delta = torch.randn(p.shape, generator=gen) * 0.02
                keep = torch.rand(p.shape, generator=gen) < 0.3  # sparse task vectors, as after fine-tuning
                p.copy_(state[name] + delta * keep)
        path = models_dir / f"finetune-{i}"
        model.save_pretrained(path, safe_serialization=True)
        tunes.append(path)
    return base, tunes


def demo(
    directory: Path = typer.Option(None, "--dir", help="work folder (default: a new temp folder)"),
    strategy: str = typer.Option("ties", "--strategy", help="merge method of the demo set"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable summary on stdout"),
) -> None:
    """Three replicas, contributions in different orders, bundles exchanged: identical bytes."""
    from convergent.sets.bundle import export_bundle, import_bundle
    from convergent.store import Store

    started = time.perf_counter()
    work = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="convergent-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    say = (lambda *_a, **_k: None) if json_out else console.print
    say(f"[bold]convergent demo[/] in {work}")
    try:
        base, tunes = _build_models(work / "models")
    except ImportError:
        from convergent.errors import ConvergentError

        raise ConvergentError("the demo needs transformers", "pip install 'convergent[hf]'") from None
    say(f"built a tiny Llama (4 layers, seeded random init) and 3 fine-tunes in {time.perf_counter() - started:.1f}s")

    params: dict[str, Any] = {"density": 0.5} if strategy in ("ties", "dare_ties", "della", "breadcrumbs_ties") else {}
    names = ["alice", "bob", "carol"]
    stores = {n: Store.open(work / "replicas" / n) for n in names}
    sets = {n: s.create_set("demo", strategy, base, params=params, dtype="bfloat16") for n, s in stores.items()}
    set_id = sets["alice"].id
    # Different contributions, in different orders, on each replica (ft 0 is added twice, concurrently).
    plan = {"alice": [0, 1], "bob": [2, 0], "carol": [1]}
    ids: dict[int, str] = {}
    for n, order in plan.items():
        for k in order:
            ids[k] = sets[n].add(tunes[k], weight=1.0, meta={"name": f"finetune-{k}"})
        say(f"  {n:5} added finetune {', '.join(map(str, order))}  root {sets[n].root[:16]}")
    # Exchange bundles: everyone sends a full bundle to everyone (any order would do).
    bundles = {n: work / "bundles" / f"{n}.tar" for n in names}
    for n in names:
        export_bundle(sets[n], bundles[n])
    for n in names:
        for m in names:
            if m != n:
                import_bundle(stores[n], bundles[m])
    rows = []
    for n in names:
        res = sets[n].resolve(work / "merged" / n, threads=2)
        rows.append((n, res.root, res.files["model.safetensors"], res.digest))
    # Remove = never had: alice removes finetune 1 and ships only what changed.
    before = sets["alice"].root
    sets["alice"].remove(ids[1])
    delta = work / "bundles" / "alice-remove.tar"
    export_bundle(sets["alice"], delta, since=before)
    for n in ("bob", "carol"):
        import_bundle(stores[n], delta)
    dave = Store.open(work / "replicas" / "dave")
    dave_set = dave.create_set("demo", strategy, base, params=params, dtype="bfloat16")
    for k in (2, 0):
        dave_set.add(tunes[k], weight=1.0, meta={"name": f"finetune-{k}"})
    after_rows = []
    for n, mset in [*((n, sets[n]) for n in names), ("dave (never had 1)", dave_set)]:
        res = mset.resolve(work / "merged-after-remove" / n.split()[0], threads=1)
        after_rows.append((n, res.root, res.files["model.safetensors"], res.digest))
    # The merged model is an ordinary Hugging Face folder.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "merged" / "alice", torch_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 17, 42, 7, 99]])).logits
    elapsed = time.perf_counter() - started
    for s in [*stores.values(), dave]:
        s.close()
    same = len({r[2] for r in rows}) == 1 and len({r[1] for r in rows}) == 1
    same_after = len({r[2] for r in after_rows}) == 1
    summary = {
        "dir": str(work),
        "set_id": set_id,
        "strategy": strategy,
        "replicas": [{"replica": r[0], "root": r[1], "model_sha256": r[2], "digest": r[3]} for r in rows],
        "after_remove": [{"replica": r[0], "root": r[1], "model_sha256": r[2], "digest": r[3]} for r in after_rows],
        "identical": same,
        "identical_after_remove": same_after,
        "forward_logits_shape": list(logits.shape),
        "seconds": round(elapsed, 2),
    }
    if json_out:
        emit_json(summary)
    else:
        for title, data in (
            ("3 replicas, 3 arrival orders, bundles exchanged", rows),
            ("after alice removes finetune-1 (delta bundle) vs a replica that never had it", after_rows),
        ):
            table = Table(title=title)
            for col in ("replica", "root", "model.safetensors sha256"):
                table.add_column(col)
            for r in data:
                table.add_row(r[0], r[1][:24] + "…", r[2])
            out.print(table)
        verdict = "[green]identical[/]" if same and same_after else "[red]DIFFERENT[/]"
        out.print(
            f"bytes across replicas: {verdict}; merged model loads in transformers, "
            f"forward pass logits {tuple(logits.shape)}; {elapsed:.1f}s"
        )
    if not (same and same_after):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("demo")(demo)
