"""Merge-set commands: create, add, remove, status, log, export, import, resolve, fsck, keygen.

Every command takes ``--store DIR`` (default ``$CONVERGENT_HOME`` or
``./.convergent``) and ``--json`` (machine-readable output on stdout).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from convergent.cli.common import console, emit_json, out, parse_pairs, parse_size, progress_bar
from convergent.errors import RecipeError

STORE_HELP = "store directory (default: $CONVERGENT_HOME or ./.convergent)"
_store_opt = typer.Option(None, "--store", help=STORE_HELP, show_default=False)
_json_opt = typer.Option(False, "--json", help="machine-readable output on stdout")


def _open(store: Path | None, create: bool = False) -> Any:
    from convergent.store import Store

    return Store.open(store, create=create)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _scalar_settings(settings: dict[str, Any] | None, where: str) -> dict[str, Any]:
    out_: dict[str, Any] = {}
    for key, value in (settings or {}).items():
        if isinstance(value, (list, dict)) or hasattr(value, "model_dump"):
            raise RecipeError(
                f"{where}: parameter '{key}' varies by layer; merge sets take one value per parameter",
                "give a single number (per-layer gradients work with 'convergent merge')",
            )
        out_[key] = value
    return out_


def create(
    name: str = typer.Argument(..., help="set name (letters, digits, . _ -)"),
    strategy: str = typer.Option(None, "--strategy", help="merge method, e.g. ties, linear, dare_ties"),
    base: Path = typer.Option(None, "--base", help="base checkpoint (defines tensor names, shapes, config)"),
    param: list[str] = typer.Option(None, "--param", help="strategy parameter key=value (repeatable)"),
    dtype: str = typer.Option(None, "--dtype", help="output dtype: float32, float16 or bfloat16"),
    recipe: Path = typer.Option(None, "--recipe", help="mergekit YAML: merge_method, base_model, parameters, models"),
    require_signed: bool = typer.Option(False, "--require-signed", help="accept only signed contributions"),
    allow_key: list[str] = typer.Option(None, "--allow-key", help="allowed signer: public key hex or .pub file"),
    store: Path = _store_opt,
    json_out: bool = _json_opt,
) -> None:
    """Create a merge set (its genesis is immutable; set id = hash of the genesis)."""
    from convergent.sets.identity import parse_public_key

    params = parse_pairs(param, "param")
    models: list[tuple[str, dict[str, Any]]] = []
    if recipe is not None:
        from convergent.recipe import load_recipe

        parsed = load_recipe(recipe)
        if parsed.slices:
            raise RecipeError(f"{recipe}: slices are not supported for merge sets", "use models:")
        here = recipe.resolve().parent
        strategy = strategy or parsed.merge_method
        if base is None and parsed.base_model:
            base = Path(parsed.base_model) if Path(parsed.base_model).is_absolute() else here / parsed.base_model
        params = {**_scalar_settings(parsed.parameters, str(recipe)), **params}
        dtype = dtype or parsed.out_dtype or parsed.dtype
        for m in parsed.models or []:
            path = Path(m.model) if Path(m.model).is_absolute() else here / m.model
            if base is not None and path.resolve() == Path(base).resolve():
                continue  # mergekit lists the base among models; it is the genesis here
            models.append((str(path), _scalar_settings(m.parameters, f"{recipe}: {m.model}")))
    if not strategy:
        raise RecipeError("no merge method given", "pass --strategy NAME (see 'convergent strategies') or --recipe")
    if base is None:
        raise RecipeError("no base checkpoint given", "pass --base PATH (or base_model: in the recipe)")
    keys = [parse_public_key(k) for k in allow_key or []]
    st = _open(store, create=True)
    with progress_bar("ingesting base", 1, enabled=not json_out) as update:
        mset = st.create_set(
            name,
            strategy,
            base,
            params=params,
            dtype=dtype,
            require_signed=require_signed,
            allowed_keys=keys,
            progress=update,
        )
    added = []
    for path, mparams in models:
        weight = float(mparams.pop("weight", 1.0))
        with progress_bar(f"adding {Path(path).name}", 1, enabled=not json_out) as update:
            added.append(mset.add(path, weight=weight, params=mparams, progress=update))
    result = {
        "set_id": mset.id,
        "name": mset.name,
        "strategy": strategy,
        "base": mset.genesis.base,
        "params": mset.genesis.params,
        "dtype": mset.genesis.dtype,
        "root": mset.root,
        "contributions": added,
        "store": str(st.path),
    }
    if json_out:
        emit_json(result)
    else:
        out.print(f"created set [bold]{name}[/] {mset.id}")
        out.print(f"root {mset.root}" + (f" ({len(added)} contributions from the recipe)" if added else ""))


def add(
    set_name: str = typer.Argument(..., metavar="SET", help="set name or id"),
    path: Path = typer.Argument(..., help="checkpoint folder or file"),
    weight: float = typer.Option(1.0, "--weight", help="mixing weight"),
    param: list[str] = typer.Option(None, "--param", help="per-model parameter key=value (repeatable)"),
    meta: list[str] = typer.Option(None, "--meta", help="metadata key=value (repeatable; part of the id)"),
    key: Path = typer.Option(None, "--key", help="Ed25519 private key file to sign with"),
    store: Path = _store_opt,
    json_out: bool = _json_opt,
) -> None:
    """Ingest a checkpoint (one hashing pass) and add it to SET."""
    st = _open(store)
    mset = st.get_set(set_name)
    with progress_bar(f"adding {path.name}", 1, enabled=not json_out) as update:
        cid = mset.add(
            path,
            weight=weight,
            params=parse_pairs(param, "param"),
            meta=parse_pairs(meta, "meta"),
            key=key,
            progress=update,
        )
    c = mset.contribution(cid)
    if json_out:
        emit_json(
            {
                "set_id": mset.id,
                "contribution": cid,
                "manifest": c.manifest,
                "weight": c.weight,
                "signer": c.signer,
                "root": mset.root,
            }
        )
    else:
        out.print(f"added {cid} to [bold]{mset.name}[/]")
        out.print(f"root {mset.root}")


def remove(
    set_name: str = typer.Argument(..., metavar="SET", help="set name or id"),
    contribution: str = typer.Argument(..., metavar="ID", help="contribution id (or a unique prefix)"),
    store: Path = _store_opt,
    json_out: bool = _json_opt,
) -> None:
    """Remove a contribution (tombstones the adds seen here; a concurrent re-add elsewhere survives)."""
    st = _open(store)
    mset = st.get_set(set_name)
    cid = mset.contribution(contribution).id
    n = mset.remove(cid)
    if json_out:
        emit_json({"set_id": mset.id, "contribution": cid, "tombstones": n, "root": mset.root})
    else:
        out.print(f"removed {cid} from [bold]{mset.name}[/] ({n} add-tag(s) tombstoned)")
        out.print(f"root {mset.root}")


def status(
    set_name: str = typer.Argument(None, metavar="[SET]", help="set name or id (all sets if omitted)"),
    peer: str = typer.Option(None, "--peer", help="compare roots with a node at URL"),
    token_file: Path = typer.Option(None, "--token-file", help="token for the peer ($CONVERGENT_TOKEN)"),
    store: Path = _store_opt,
    json_out: bool = _json_opt,
) -> None:
    """Show a set's root and live contributions (or list the sets in the store)."""
    st = _open(store)
    if set_name is None:
        sets = st.list_sets()
        if json_out:
            emit_json({"store": str(st.path), "sets": [vars(s) for s in sets]})
            return
        table = Table(title=f"merge sets in {st.path}")
        for col in ("name", "id", "strategy", "live", "root"):
            table.add_column(col)
        for s in sets:
            table.add_row(s.name, s.id[:16], s.strategy, str(s.live), s.root[:16])
        out.print(table)
        return
    mset = st.get_set(set_name)
    live = mset.contributions()
    g = mset.genesis
    data: dict[str, Any] = {
        "set_id": mset.id,
        "name": mset.name,
        "strategy": g.strategy,
        "params": g.params,
        "dtype": g.dtype,
        "base": g.base,
        "require_signed": g.require_signed,
        "allowed_keys": list(g.allowed_keys),
        "root": mset.root,
        "live": [
            {
                "id": c.id,
                "manifest": c.contribution.manifest,
                "weight": c.contribution.weight,
                "params": c.contribution.params,
                "meta": c.contribution.meta,
                "signer": c.contribution.signer,
                "bytes": c.nbytes,
                "tensors": c.tensors,
            }
            for c in live
        ],
    }
    if peer:
        from convergent.node.sync import compare_roots

        token = token_file.read_text().strip() if token_file else os.environ.get("CONVERGENT_TOKEN")
        data["peer"] = compare_roots(st, mset.id, peer, token)
    if json_out:
        emit_json(data)
        return
    out.print(f"set [bold]{mset.name}[/] {mset.id}")
    out.print(
        f"strategy {g.strategy} {g.params or ''} dtype {g.dtype or 'as base'}"
        + (f"; signed by {len(g.allowed_keys)} allowed key(s) only" if g.require_signed else "")
    )
    out.print(f"root [bold]{mset.root}[/]")
    table = Table(title=f"{len(live)} live contribution(s), canonical order")
    for col in ("id", "weight", "params", "meta", "size", "signer"):
        table.add_column(col)
    for c in live:
        k = c.contribution
        table.add_row(
            c.id[:16], f"{k.weight:g}", str(k.params or ""), str(k.meta or ""), _size(c.nbytes), (k.signer or "")[:16]
        )
    out.print(table)
    if peer:
        p = data["peer"]
        verdict = "[green]agree[/]" if p.get("agree") else "[red]differ[/]"
        out.print(
            f"peer {peer}: roots {verdict} (local {p.get('local_root', '')[:16]}, "
            f"remote {str(p.get('remote_root'))[:16]})"
        )


def log(
    set_name: str = typer.Argument(..., metavar="SET", help="set name or id"),
    store: Path = _store_opt,
    json_out: bool = _json_opt,
) -> None:
    """History of creates, adds, removes and joins on this replica."""
    import datetime

    st = _open(store)
    mset = st.get_set(set_name)
    entries = mset.log()
    if json_out:
        emit_json({"set_id": mset.id, "log": entries})
        return
    table = Table(title=f"history of {mset.name} on this replica")
    for col in ("seq", "when", "op", "what", "root after"):
        table.add_column(col)
    for e in entries:
        when = datetime.datetime.fromtimestamp(e["at"]).strftime("%Y-%m-%d %H:%M:%S")
        what = {k: v for k, v in e.items() if k not in ("seq", "op", "root", "at")}
        if "contribution" in what:
            what["contribution"] = what["contribution"][:16]
        table.add_row(str(e["seq"]), when, e["op"], ", ".join(f"{k}={v}" for k, v in what.items()), e["root"][:16])
    out.print(table)


def export(
    set_name: str = typer.Argument(..., metavar="SET", help="set name or id"),
    file: Path = typer.Argument(..., help="bundle file to write"),
    since: str = typer.Option(None, "--since", help="only what this replica learnt after it had root ROOT"),
    store: Path = _store_opt,
    json_out: bool = _json_opt,
) -> None:
    """Write a self-contained bundle (state, manifests, blobs) for another replica."""
    from convergent.sets.bundle import export_bundle

    st = _open(store)
    mset = st.get_set(set_name)
    res = export_bundle(mset, file, since=since)
    if json_out:
        emit_json(res.to_dict())
    else:
        out.print(
            f"wrote {file}: {res.contributions} contribution record(s), {res.manifests} manifest(s), "
            f"{res.blobs} blob(s), {_size(res.bytes)}"
        )


def import_(
    file: Path = typer.Argument(..., help="bundle written by 'convergent export'"),
    store: Path = _store_opt,
    json_out: bool = _json_opt,
) -> None:
    """Verify a bundle (every byte against its hash) and join it; all or nothing."""
    from convergent.sets.bundle import import_bundle

    st = _open(store, create=True)
    res = import_bundle(st, file)
    if json_out:
        emit_json(res.to_dict())
    else:
        j = res.join
        learnt = " (new set)" if res.learnt_set else ""
        out.print(
            f"joined into [bold]{res.name}[/]{learnt}: {j.new_adds} add(s), {j.new_removes} remove(s), "
            f"{res.blobs_new} new blob(s)"
        )
        out.print(f"root {j.root_after}")


def resolve(
    set_name: str = typer.Argument(..., metavar="SET", help="set name or id"),
    out_dir: Path = typer.Argument(..., help="output folder (written atomically)"),
    threads: int = typer.Option(min(4, os.cpu_count() or 1), "--threads", help="tensors merged in parallel"),
    memory_limit: str = typer.Option("2GB", "--memory-limit", help="working-memory budget"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    no_cache: bool = typer.Option(False, "--no-cache", help="merge again even if this root was resolved before"),
    store: Path = _store_opt,
    json_out: bool = _json_opt,
) -> None:
    """Merge the live contributions (sorted by id, seeded by the root) into OUT_DIR."""
    st = _open(store)
    mset = st.get_set(set_name)
    with progress_bar(f"resolving {mset.name} ({mset.genesis.strategy})", 1, enabled=not json_out) as update:
        res = mset.resolve(
            out_dir,
            threads=max(1, threads),
            memory_limit=parse_size(memory_limit),
            overwrite=overwrite,
            use_cache=not no_cache,
            progress=update,
        )
    if json_out:
        emit_json(res.to_dict())
        return
    cached = " (cached)" if res.cached else ""
    out.print(
        f"resolved [bold]{mset.name}[/] at root {res.root[:16]} with {len(res.contributions)} "
        f"contribution(s) into {res.out_dir}{cached} in {res.seconds:.1f}s"
    )
    table = Table()
    table.add_column("file")
    table.add_column("sha256")
    for name, digest in sorted(res.files.items()):
        table.add_row(name, digest)
    out.print(table)


def fsck(
    store: Path = _store_opt,
    json_out: bool = _json_opt,
) -> None:
    """Re-hash every blob and check every reference; exits 1 if anything is wrong."""
    st = _open(store)
    with progress_bar("checking blobs", 1, enabled=not json_out) as update:
        rep = st.fsck(progress=update)
    if json_out:
        emit_json(rep.to_dict())
    else:
        out.print(
            f"checked {rep.blobs_checked} blobs, {rep.manifests_checked} manifests, "
            f"{rep.contributions_checked} contributions, {rep.sets_checked} sets"
        )
        for e in rep.errors:
            console.print(f"[red]error[/] {e}")
        if rep.unreferenced_blobs:
            out.print(f"{len(rep.unreferenced_blobs)} unreferenced blob(s) (left by interrupted writes; harmless)")
        out.print("[green]ok[/]" if rep.ok else f"[red]{len(rep.errors)} problem(s)[/]")
    if not rep.ok:
        raise typer.Exit(1)


def keygen(
    file: Path = typer.Argument(..., help="private key file to write (public key goes to FILE.pub)"),
    store: Path = _store_opt,
    json_out: bool = _json_opt,
) -> None:
    """Create an Ed25519 key pair for signing contributions."""
    from convergent.sets.identity import keygen as make_key

    del store  # accepted for uniformity; keys live outside the store
    pub = make_key(file)
    if json_out:
        emit_json({"private_key": str(file), "public_key_file": f"{file}.pub", "public_key": pub})
    else:
        out.print(f"wrote {file} (keep it private) and {file}.pub")
        out.print(f"public key {pub}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    for fn, name in (
        (create, "create"),
        (add, "add"),
        (remove, "remove"),
        (status, "status"),
        (log, "log"),
        (export, "export"),
        (import_, "import"),
        (resolve, "resolve"),
        (fsck, "fsck"),
        (keygen, "keygen"),
    ):
        app.command(name)(fn)
