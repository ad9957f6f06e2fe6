"""Gossip: repeated anti-entropy with peers picked at random, and the in-process node runner.

Each round picks one peer uniformly at random (from a seeded generator, so a
run can be replayed) and runs :func:`convergent.node.sync.sync_set` for every
set being gossiped. Rounds are spaced by ``interval`` seconds and bounded by
``rounds`` (None: until stopped). With n nodes each syncing both ways with
one random peer per round, knowledge spreads like an epidemic: everyone
holds everything after O(log n) rounds, with high probability.

``run_node`` serves the HTTP API with uvicorn in this process and, given
gossip peers, runs the gossip loop in a background thread over the same store.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from convergent.errors import ConvergentError, SyncError
from convergent.node.client import PeerClient, normalize_url
from convergent.node.sync import SyncReport, sync_set

log = logging.getLogger("convergent.node")

#: Shortest allowed pause between rounds (seconds) and most rounds one call may run.
MIN_INTERVAL = 0.01
MAX_ROUNDS = 1_000_000


@dataclass
class GossipResult:
    rounds: int = 0
    syncs: int = 0
    failures: int = 0
    refusals: int = 0
    reports: list[SyncReport] = field(default_factory=list)

    def as_dict(self, with_reports: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rounds": self.rounds,
            "syncs": self.syncs,
            "failures": self.failures,
            "refusals": self.refusals,
        }
        if with_reports:
            out["reports"] = [r.as_dict() for r in self.reports]
        return out


def parse_interval(text: str | float) -> float:
    """'2s' / '500ms' / '1m' / 2 -> seconds (at least MIN_INTERVAL)."""
    s = str(text).strip().lower()
    scale = 1.0
    for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if s.endswith(suffix):
            s, scale = s[: -len(suffix)], mult
            break
    try:
        value = float(s) * scale
    except ValueError:
        raise SyncError(f"cannot read interval '{text}'", "write it like 2s, 500ms or 1m") from None
    if not value >= MIN_INTERVAL or value > 24 * 3600:
        raise SyncError(f"interval '{text}' out of range", f"use between {MIN_INTERVAL}s and 24h")
    return value


def gossip(
    store: Any,
    sets: list[str] | None,
    peers: list[str],
    *,
    rounds: int | None = None,
    interval: float = 2.0,
    seed: int | None = None,
    token: str | None = None,
    node: Any = None,
    stop: threading.Event | None = None,
    on_report: Callable[[SyncReport], None] | None = None,
    keep_reports: bool = True,
    timeout: float = 30.0,
) -> GossipResult:
    """Run gossip rounds. ``sets`` None gossips every set the store holds at each round.

    ``node`` (a :class:`convergent.node.server.NodeState`) gives this node's
    URL (sent to peers, and dropped from ``peers``), its partitions (refused
    peers are skipped for the round) and receives the round counters.
    """
    peers = sorted({normalize_url(p) for p in peers})
    own = node.url if node is not None else None
    peers = [p for p in peers if p != own]
    if not peers:
        raise SyncError("gossip needs at least one peer other than this node")
    if rounds is not None and not 0 < rounds <= MAX_ROUNDS:
        raise SyncError(f"rounds must be between 1 and {MAX_ROUNDS}")
    interval = max(float(interval), MIN_INTERVAL)
    rng = random.Random(seed)
    stop = stop or threading.Event()
    result = GossipResult()
    while not stop.is_set() and (rounds is None or result.rounds < rounds):
        started = time.monotonic()
        peer = rng.choice(peers)
        try:
            targets = sets if sets is not None else [s.id for s in store.list_sets()]
        except ConvergentError as exc:  # e.g. the database is busy: try again next round
            log.warning("gossip: cannot list sets: %s", exc.message)
            targets = []
        with PeerClient(peer, token, node_url=own, timeout=timeout, retries=1) as client:  # one per round
            for ref in targets:
                if node is not None and node.partitions.refuses(peer):
                    report = SyncReport(peer=peer, set_id=ref, error="partitioned")
                else:
                    try:
                        report = sync_set(store, ref, peer, token, client=client)
                    except ConvergentError as exc:  # unknown set and the like
                        report = SyncReport(peer=peer, set_id=ref, error=exc.message)
                result.syncs += 1
                result.failures += report.error is not None
                result.refusals += report.refused is not None
                if keep_reports:
                    result.reports.append(report)
                if node is not None and report.joined_local:
                    node.note_change()
                if node is not None and report.traffic:
                    g = node.gossip
                    g["blob_bytes_received"] += report.traffic.get("blob_bytes_received", 0)
                    g["blob_bytes_sent"] += report.traffic.get("blob_bytes_sent", 0)
                    g["bytes_received"] += report.traffic.get("received", 0)
                    g["bytes_sent"] += report.traffic.get("sent", 0)
                if on_report:
                    on_report(report)
        result.rounds += 1
        if node is not None:
            node.gossip.update(
                running=True,
                rounds=result.rounds,
                syncs=result.syncs,
                failures=result.failures,
                refusals=result.refusals,
                last_round=time.time(),
            )
        if rounds is not None and result.rounds >= rounds:
            break
        stop.wait(max(0.0, interval - (time.monotonic() - started)))
    return result


def run_node(
    store: Any,
    host: str,
    port: int,
    write_token: str | None,
    read_token: str | None = None,
    *,
    gossip_peers: list[str] | None = None,
    interval: float = 2.0,
    seed: int | None = None,
    peer_token: str | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the API on host:port until interrupted; gossip with ``gossip_peers`` in the background."""
    import uvicorn

    # Import what the first join needs now, so that no peer waits for it later.
    import convergent.sets.mergeset
    import convergent.strategies.run  # noqa: F401
    from convergent.node.server import NodeState, create_app

    node = NodeState(url=f"http://{host}:{port}")
    app = create_app(store, write_token, read_token, node=node)
    stop = threading.Event()
    thread = None
    if gossip_peers:
        token = peer_token if peer_token is not None else write_token

        def loop() -> None:
            try:
                gossip(
                    store,
                    None,
                    gossip_peers,
                    interval=interval,
                    seed=seed,
                    token=token,
                    node=node,
                    stop=stop,
                    keep_reports=False,
                    on_report=_log_report,
                )
            except Exception:  # the node keeps serving; the failure is logged
                log.exception("gossip loop stopped")
            finally:
                node.gossip["running"] = False

        thread = threading.Thread(target=loop, name="convergent-gossip", daemon=True)
        node.gossip["running"] = True
        thread.start()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=10)


def _log_report(report: SyncReport) -> None:
    if report.refused:
        log.warning("gossip: refused %s: %s", report.peer, report.refused)
    elif report.error and report.error != "partitioned":
        log.info("gossip: %s: %s", report.peer, report.error)
    elif report.joined_local or report.joined_remote:
        log.info(
            "gossip: %s: local root %s… remote root %s…",
            report.peer,
            report.local_root_after[:12],
            (report.remote_root_after or "")[:12],
        )
