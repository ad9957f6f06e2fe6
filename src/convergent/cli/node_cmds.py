"""Node commands: ``serve``, ``sync``, ``gossip`` (see docs/nodes.md)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from convergent.cli.common import console, emit_json, progress_bar

STORE_HELP = "store directory (default: $CONVERGENT_HOME, else ./.convergent)"
TOKEN_HELP = "file holding the peers' write token (default: $CONVERGENT_TOKEN); without one, nothing is pushed"


def _open_store(store: Path | None):
    from convergent.store import Store

    return Store.open(store)


def _split_peers(values: list[str] | None) -> list[str]:
    from convergent.node.client import normalize_url

    out: list[str] = []
    for value in values or []:
        out += [normalize_url(p) for p in value.split(",") if p.strip()]
    return list(dict.fromkeys(out))


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def serve(
    store: Path | None = typer.Option(None, "--store", help=STORE_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8470, "--port", min=0, max=65535, help="port to listen on"),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="file holding the write token; without it the node accepts no writes"
    ),
    read_token_file: Path | None = typer.Option(
        None, "--read-token-file", help="file holding a read token; without it reads are open"
    ),
    gossip_peers: str | None = typer.Option(
        None, "--gossip-peers", help="comma-separated peer URLs to gossip every set with, in the background"
    ),
) -> None:
    """Serve a store over HTTP: sets, states, roots, manifests, blobs (Range); token-protected writes."""
    from convergent.node.auth import TOKEN_ENV
    from convergent.node.auth import read_token_file as load_token
    from convergent.node.gossip import parse_interval, run_node

    _setup_logging(verbose=os.environ.get("CONVERGENT_NODE_VERBOSE") == "1")
    write_token = load_token(token_file) if token_file else None
    read_token = load_token(read_token_file) if read_token_file else None
    peers = _split_peers([gossip_peers] if gossip_peers else None)
    interval = parse_interval(os.environ.get("CONVERGENT_GOSSIP_INTERVAL", "2s"))
    seed_env = os.environ.get("CONVERGENT_GOSSIP_SEED")
    peer_token = os.environ.get(TOKEN_ENV, "").strip() or None
    st = _open_store(store)
    console.print(
        f"convergent node on http://{host}:{port} (store {st.path}; writes "
        f"{'need a token' if write_token else 'disabled'}; reads {'need a token' if read_token else 'open'}"
        f"{'; gossip with ' + str(len(peers)) + ' peers' if peers else ''})"
    )
    run_node(
        st,
        host,
        port,
        write_token,
        read_token,
        gossip_peers=peers,
        interval=interval,
        seed=int(seed_env) if seed_env else None,
        peer_token=peer_token,
    )


def sync(
    set_ref: str = typer.Argument(..., metavar="SET", help="set name or id (learned from the peer if absent here)"),
    peer: list[str] = typer.Option(..., "--peer", help="peer URL (repeat for several)"),
    token_file: Path | None = typer.Option(None, "--token-file", help=TOKEN_HELP),
    store: Path | None = typer.Option(None, "--store", help=STORE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print a JSON report"),
) -> None:
    """One anti-entropy round with each peer: pull what this store lacks, push what the peer lacks."""
    from convergent.node.auth import client_token
    from convergent.node.sync import sync_set

    _setup_logging()
    token = client_token(token_file)
    peers = _split_peers(peer)
    st = _open_store(store)
    reports = []
    for url in peers:
        with progress_bar(f"sync {url}", 0, enabled=not json_out) as bar:
            report = sync_set(st, set_ref, url, token, progress=lambda done, total: bar(done, total))
        reports.append(report)
        if not json_out:
            _print_report(report)
    if json_out:
        emit_json({"set": set_ref, "reports": [r.as_dict() for r in reports], "ok": all(r.ok for r in reports)})
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


def gossip(
    set_ref: str = typer.Argument(..., metavar="SET", help="set name or id"),
    peers: str = typer.Option(..., "--peers", help="comma-separated peer URLs"),
    interval: str = typer.Option("2s", "--interval", help="pause between rounds, like 2s or 500ms"),
    rounds: int | None = typer.Option(None, "--rounds", min=1, help="stop after N rounds (default: until Ctrl-C)"),
    token_file: Path | None = typer.Option(None, "--token-file", help=TOKEN_HELP),
    store: Path | None = typer.Option(None, "--store", help=STORE_HELP),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary at the end"),
) -> None:
    """Repeated sync with peers picked at random (seed: $CONVERGENT_GOSSIP_SEED)."""
    from convergent.node.auth import client_token
    from convergent.node.gossip import gossip as run_gossip
    from convergent.node.gossip import parse_interval

    _setup_logging()
    token = client_token(token_file)
    urls = _split_peers([peers])
    seconds = parse_interval(interval)
    seed_env = os.environ.get("CONVERGENT_GOSSIP_SEED")
    st = _open_store(store)
    on_report = None if json_out else _print_report
    try:
        result = run_gossip(
            st,
            [set_ref],
            urls,
            rounds=rounds,
            interval=seconds,
            token=token,
            seed=int(seed_env) if seed_env else None,
            on_report=on_report,
            keep_reports=json_out,
        )
    except KeyboardInterrupt:
        console.print("gossip stopped")
        return
    if json_out:
        emit_json(result.as_dict())
    else:
        console.print(
            f"{result.rounds} rounds, {result.syncs} syncs, {result.failures} failed, {result.refusals} refused"
        )


def _print_report(report) -> None:
    if report.refused:
        console.print(f"[red]refused[/red] {report.peer}: {report.refused}")
        return
    if report.error:
        console.print(f"[yellow]failed[/yellow] {report.peer}: {report.error}")
        return
    state = "in sync" if report.in_sync else "differs"
    pulled = f"pulled {report.pulled_manifests} manifests, {report.pulled_blobs} blobs ({report.pulled_blob_bytes} B)"
    pushed = f"pushed {report.pushed_manifests} manifests, {report.pushed_blobs} blobs ({report.pushed_blob_bytes} B)"
    if report.push_skipped:
        pushed = f"push skipped: {report.push_skipped}"
    console.print(
        f"{report.peer} {report.set_name or report.set_id[:12]}: {state}; root {report.local_root_after[:16]}…; "
        f"{pulled}; {pushed}"
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("serve")(serve)
    app.command("sync")(sync)
    app.command("gossip")(gossip)
