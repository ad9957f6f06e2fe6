"""Anti-entropy between two replicas of a merge set, kept apart from the data type.

One round with a peer (:func:`sync_set`):

1. compare: ask the peer for its root and state digest; equal digests end the round;
2. pull: fetch the peer's state, check it (set id, genesis hash, every
   contribution's signature against the set's policy) before fetching any
   data, then fetch only the manifests and blobs this store lacks (each
   verified against its hash; blobs resume with HTTP Range), then join,
   atomically. A peer whose bytes do not match their hashes, or whose state
   carries a forged or unsigned contribution into a signed set, is refused
   and logged; nothing of its state is joined;
3. push (with a token): ask the peer which of our manifests and blobs it
   lacks, upload only those (resumable), then post our state for it to join.

The set itself (OR-Set join, Merkle root, signature policy) lives in
``convergent.sets``; this module only moves verified bytes between stores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from convergent.errors import ConvergentError, IntegrityError, SignatureError, StoreError, SyncError
from convergent.node.client import Busy, PeerClient, PeerError, normalize_url
from convergent.sets.canonical import is_hex_id, sha256_hex

log = logging.getLogger("convergent.node")

#: Cap on the size of a non-tensor file blob (config, tokenizer) fetched from a peer.
FILE_BLOB_LIMIT = 4 << 30

Progress = Callable[[int, int], None]


@dataclass
class SyncReport:
    """What one anti-entropy round with one peer did."""

    peer: str
    set_id: str
    set_name: str = ""
    local_root_before: str = ""
    remote_root_before: str | None = None
    local_root_after: str = ""
    remote_root_after: str | None = None
    in_sync: bool = False
    pulled_manifests: int = 0
    pulled_blobs: int = 0
    pulled_blob_bytes: int = 0
    pushed_manifests: int = 0
    pushed_blobs: int = 0
    pushed_blob_bytes: int = 0
    joined_local: bool = False
    joined_remote: bool = False
    push_skipped: str | None = None
    refused: str | None = None
    error: str | None = None
    traffic: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.refused is None and self.error is None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def state_digest(state: Any) -> str:
    return sha256_hex(state.to_json())


def parse_state(data: bytes, set_id: str) -> Any:
    """A peer's SetState, checked: right set, genesis hashes to the set id, every contribution
    belongs to the set and passes its signature policy. ValueError if malformed,
    IntegrityError/SignatureError if it lies."""
    from convergent.sets.identity import check_policy
    from convergent.sets.model import SetState

    state = SetState.from_json(data)
    if state.set_id != set_id or state.genesis.id != set_id:
        raise IntegrityError(f"state claims set {state.set_id[:12]}… with a genesis not hashing to {set_id[:12]}…")
    for c in state.contributions:
        if c.set != set_id:
            raise IntegrityError(f"contribution {c.id[:12]}… belongs to another set")
        check_policy(c, state.genesis)
    known = {c.id for c in state.contributions}
    for tag in (*state.adds, *state.removes):
        if tag.contribution not in known:
            raise IntegrityError(f"add-tag names contribution {tag.contribution[:12]}…, whose record is missing")
    return state


def referenced_manifests(state: Any) -> list[str]:
    return sorted({state.genesis.base} | {c.manifest for c in state.contributions})


def needed(store: Any, state: Any) -> tuple[list[str], list[str]]:
    """Every manifest and blob ``state`` references (its manifests must be in ``store``)."""
    mids = referenced_manifests(state)
    blobs: set[str] = set()
    for mid in mids:
        blobs |= store.get_manifest(mid).blobs()
    return mids, sorted(blobs)


def missing_for(store: Any, state: Any) -> tuple[list[str], list[str]]:
    """(manifests, blobs) ``store`` lacks before it can join ``state`` (blobs only of manifests it has)."""
    try:
        mset = store.get_set(state.set_id)
    except StoreError:
        mset = None
    if mset is not None:
        return mset.missing(state)
    mids = referenced_manifests(state)
    absent = set(store.missing_manifests(mids))
    blobs: set[str] = set()
    for mid in mids:
        if mid not in absent:
            blobs |= store.get_manifest(mid).blobs()
    return sorted(absent), store.blobs.missing(blobs)


def blob_limits(store: Any, manifest_ids: list[str], extra: dict[str, Any] | None = None) -> dict[str, int]:
    """Exact size of each tensor blob the manifests reference (file blobs: :data:`FILE_BLOB_LIMIT`).

    Manifests are taken from ``extra`` (fetched, not stored yet) or the store.
    """
    from convergent.store.blobs import blob_header, dtype_itemsize

    limits: dict[str, int] = {}
    for mid in manifest_ids:
        m = (extra or {}).get(mid) or store.get_manifest(mid)
        for entry in m.tensors.values():
            n = 1
            for d in entry.shape:
                n *= d
            limits[entry.blob] = len(blob_header(entry.dtype, entry.shape)) + n * dtype_itemsize(entry.dtype)
        for digest in m.files.values():
            limits.setdefault(digest, FILE_BLOB_LIMIT)
    return limits


def receive_state(store: Any, set_id: str, data: bytes, origin: str = "", staging: Any = None) -> dict[str, Any]:
    """Server side of a push: check the state, then join it if every byte it needs is here.

    Manifests and blobs may be in the store or staged (uploaded, verified, not
    yet in the store; see :mod:`convergent.node.staging`). Returns
    ``{"missing": {...}}`` when some are absent (nothing joined), else the
    join's outcome. A refused state (ValueError if malformed,
    IntegrityError/SignatureError/... if it lies) deletes what it staged; the
    store is untouched. A set this store does not hold yet is learnt in the
    same transaction as the join.
    """
    from convergent.node.staging import Staging
    from convergent.sets.mergeset import join_state, validate_state

    staging = staging or Staging(store)
    state = parse_state(data, set_id)
    mids, blobs = missing_for(store, state)
    manifests: dict[str, Any] = {}
    lacking_m: list[str] = []
    needed_blobs = set(blobs)
    for mid in mids:
        m = staging.get_manifest(mid)
        if m is None:
            lacking_m.append(mid)
            continue
        manifests[mid] = m
        needed_blobs |= {d for d in m.blobs() if not store.blobs.has(d)}
    lacking_b = sorted(d for d in needed_blobs if not staging.has_blob(d))
    if lacking_m or lacking_b:
        return {"missing": {"manifests": lacking_m, "blobs": lacking_b}}
    try:
        validate_state(store, state, manifests, blobs_present=needed_blobs)
        for digest in sorted(needed_blobs):
            if not staging.install_blob(digest):
                return {"missing": {"manifests": [], "blobs": [digest]}}
    except ConvergentError:
        staging.discard(list(manifests), sorted(needed_blobs))
        raise
    result = join_state(store, state, manifests=manifests, origin=origin, learn=not _has_set(store, set_id))
    staging.discard(list(manifests), [])
    after = store.get_set(set_id).state()
    return {
        "missing": None,
        "root_before": result.root_before,
        "root": result.root_after,
        "changed": result.changed,
        "new_adds": result.new_adds,
        "new_removes": result.new_removes,
        "state_digest": state_digest(after),
    }


def _has_set(store: Any, set_id: str) -> bool:
    try:
        return store.get_set(set_id).id == set_id
    except StoreError:
        return False


def _find_set(store: Any, ref: str, client: PeerClient) -> tuple[str, Any, Any]:
    """(set id, genesis, local MergeSet or None) for ``ref``; a set only the peer holds is
    identified through the peer's list and its genesis checked against its id."""
    try:
        mset = store.get_set(ref)
        return mset.id, mset.genesis, mset
    except StoreError as missing_here:
        sets = client.sets()
        hits = [s for s in sets if isinstance(s, dict) and (s.get("id") == ref or s.get("name") == ref)]
        if len(hits) != 1 or not is_hex_id(str(hits[0].get("id"))):
            raise missing_here
        set_id = hits[0]["id"]
        data = client.genesis_bytes(set_id)
        if sha256_hex(data) != set_id:
            raise IntegrityError(f"peer {client.url} sent a genesis that does not hash to {set_id[:12]}…") from None
        from convergent.sets.model import Genesis

        return set_id, Genesis.model_validate_json(data), None


def sync_set(
    store: Any,
    set_ref: str,
    peer_url: str,
    token: str | None = None,
    *,
    node_url: str | None = None,
    push: bool = True,
    progress: Progress | None = None,
    client: PeerClient | None = None,
    timeout: float = 30.0,
    retries: int = 3,
) -> SyncReport:
    """One anti-entropy round for one set with one peer; never raises for peer trouble (see the report)."""
    started = time.monotonic()
    own = client is None
    client = client or PeerClient(peer_url, token, node_url=node_url, timeout=timeout, retries=retries)
    report = SyncReport(peer=client.url, set_id=set_ref)
    before = client.traffic.as_dict()
    try:
        _sync(store, set_ref, client, token, report, push, progress)
    except (IntegrityError, SignatureError) as exc:
        report.refused = exc.message
        log.warning("refused peer %s for set %s: %s", client.url, report.set_id[:12], exc.message)
    except Busy as exc:
        report.error = exc.message
    except ConvergentError as exc:
        report.error = exc.message + (f" ({exc.hint})" if exc.hint else "")
    except OSError as exc:  # e.g. this store lost a blob it claims to hold
        report.error = f"local I/O error: {exc}"
    except ValueError as exc:  # malformed JSON from the peer
        report.refused = f"malformed answer: {exc}"[:500]
        log.warning("refused peer %s: malformed answer", client.url)
    except Exception as exc:  # never let one peer's oddity stop a gossip loop
        report.error = f"unexpected {type(exc).__name__}: {exc}"[:500]
        log.exception("sync with %s failed unexpectedly", client.url)
    finally:
        report.traffic = {k: v - before.get(k, 0) for k, v in client.traffic.as_dict().items()}
        report.seconds = round(time.monotonic() - started, 4)
        if own:
            client.close()
    return report


def _sync(
    store: Any,
    set_ref: str,
    client: PeerClient,
    token: str | None,
    report: SyncReport,
    push: bool,
    progress: Progress | None,
) -> None:
    from convergent.sets.mergeset import join_state
    from convergent.sets.model import SetState

    set_id, genesis, mset = _find_set(store, set_ref, client)
    report.set_id = set_id
    report.set_name = genesis.name
    local = mset.state() if mset is not None else SetState(set_id=set_id, genesis=genesis)
    local_digest = state_digest(local)
    report.local_root_before = report.local_root_after = local.root
    remote_info = client.root(set_id)
    remote_digest = None
    if remote_info is not None:
        report.remote_root_before = report.remote_root_after = str(remote_info.get("root"))
        remote_digest = remote_info.get("state_digest")
    if remote_digest == local_digest:
        report.in_sync = True
        return

    # -- pull --------------------------------------------------------------
    if remote_info is not None:
        remote = parse_state(client.state_bytes(set_id), set_id)
        remote_digest = state_digest(remote)
        manifests = _pull_manifests(store, client, remote, report)
        _pull_blobs(store, client, remote, manifests, report, progress)
        result = join_state(store, remote, manifests=manifests, origin=client.url, learn=mset is None)
        mset = store.get_set(set_id)
        report.joined_local = result.changed
        local = mset.state()
        local_digest = state_digest(local)
        report.local_root_after = local.root
        if local_digest == remote_digest:
            report.in_sync = True
            return

    # -- push --------------------------------------------------------------
    if not push:
        report.push_skipped = "push disabled"
        return
    if not token:
        report.push_skipped = "no token: pulled only (give --token-file or $CONVERGENT_TOKEN to push)"
        return
    for _ in range(3):
        mids, blobs = needed(store, local)
        lack_m, lack_b = client.missing(mids, blobs)
        for mid in lack_m:
            if mid not in mids:
                continue
            client.put_manifest(mid, store.get_manifest_bytes(mid))
            report.pushed_manifests += 1
        for digest in lack_b:
            if digest not in blobs:
                continue
            report.pushed_blob_bytes += client.upload_blob(digest, store.blobs.path(digest))
            report.pushed_blobs += 1
        try:
            answer = client.push_state(set_id, local.to_json())
        except PeerError as exc:
            if exc.status == 409 and isinstance(exc.body, dict) and exc.body.get("missing"):
                continue  # the peer lost something meanwhile (e.g. restarted): ask again
            if exc.status == 422:
                raise SyncError(f"peer {client.url} refused our state: {exc.body}") from None
            raise
        report.joined_remote = bool(answer.get("changed"))
        report.remote_root_after = answer.get("root")
        report.in_sync = answer.get("state_digest") == local_digest
        return
    raise SyncError(f"peer {client.url} kept reporting missing data after uploads")


def _pull_manifests(store: Any, client: PeerClient, remote: Any, report: SyncReport) -> dict[str, Any]:
    """Fetch and verify the manifests ``remote`` needs that are not here; kept in memory until the join."""
    from convergent.store.store import parse_manifest

    mids, _ = missing_for(store, remote)
    out: dict[str, Any] = {}
    for mid in mids:
        try:
            out[mid] = parse_manifest(client.manifest_bytes(mid), mid)
        except IntegrityError as exc:
            raise IntegrityError(f"manifest {mid[:12]}… from {client.url}: {exc.message}") from None
        report.pulled_manifests += 1
    return out


def _pull_blobs(
    store: Any,
    client: PeerClient,
    remote: Any,
    manifests: dict[str, Any],
    report: SyncReport,
    progress: Progress | None,
) -> None:
    """Check the state can be joined, then fetch every blob it lacks into partial files, verify
    each, and only when all verify install them. A wrong blob deletes what this round fetched."""
    from convergent.sets.mergeset import validate_state

    _, known = missing_for(store, remote)
    fetched_blobs = {d for m in manifests.values() for d in m.blobs()}
    blobs = sorted(set(known) | {d for d in fetched_blobs if not store.blobs.has(d)})
    # Refuse before downloading anything when the state cannot be joined (shapes, parameters, ...).
    validate_state(store, remote, manifests, blobs_present=blobs)
    if not blobs:
        return
    limits = blob_limits(store, referenced_manifests(remote), manifests)
    total = sum(limits.get(d, 0) for d in blobs)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    staged: list[tuple[str, Any]] = []
    try:
        for digest in blobs:
            if store.blobs.has(digest):
                continue
            part = store.tmp_dir / f"dl-{digest}.part"
            resumed = part.exists() and part.stat().st_size > 0
            before = client.traffic.blob_bytes_received
            try:
                actual = client.download_blob(digest, part, limits[digest], tick)
                if actual != digest and resumed:  # the old partial file may be what is wrong: start over
                    part.unlink(missing_ok=True)
                    actual = client.download_blob(digest, part, limits[digest], tick)
            finally:
                report.pulled_blob_bytes += client.traffic.blob_bytes_received - before
            if actual != digest:
                raise IntegrityError(f"blob {digest[:12]}… from {client.url} does not match its hash")
            staged.append((digest, part))
    except IntegrityError:
        for _digest, part in staged:
            part.unlink(missing_ok=True)
        (store.tmp_dir / f"dl-{digest}.part").unlink(missing_ok=True)
        raise
    for digest, part in staged:
        store.blobs.put_file(part, digest)  # re-checks hash and shape, fsyncs, renames into place
        report.pulled_blobs += 1


def compare_roots(store: Any, set_id: str, peer_url: str, token: str | None = None) -> dict[str, Any]:
    """Local vs peer root for a set: ``{"agree": bool, "local_root", "remote_root", ...}``.

    Used by ``convergent status SET --peer URL``. ``agree`` compares roots (the
    live contributions); ``states_equal`` also compares add-tags and tombstones.
    """
    mset = store.get_set(set_id)
    local = mset.state()
    with PeerClient(peer_url, token, retries=1, timeout=10.0) as client:
        remote = client.root(mset.id)
    out: dict[str, Any] = {
        "set_id": mset.id,
        "name": mset.name,
        "peer": normalize_url(peer_url),
        "local_root": local.root,
        "local_live": len(local.live()),
        "peer_has_set": remote is not None,
        "remote_root": remote.get("root") if remote else None,
        "remote_live": remote.get("live") if remote else None,
    }
    out["agree"] = remote is not None and remote.get("root") == local.root
    out["states_equal"] = remote is not None and remote.get("state_digest") == state_digest(local)
    return out
