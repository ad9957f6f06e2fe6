"""``MergeSet``: one replicated set of contributions in a store.

Verbs: ``add`` (ingest + add-tag), ``remove`` (tombstone observed tags),
``state``/``join`` (exchange with replicas), ``missing`` (what to fetch
before joining), ``resolve`` (run the strategy through the engine), ``root``.

Sync flow for a node learning from a peer::

    state = SetState.from_json(peer_state_bytes)
    mset = store.add_set(state.genesis)            # no-op if known
    manifests, _ = mset.missing(state)             # fetch them: store.put_manifest_bytes(...)
    _, blobs = mset.missing(state)                 # fetch them: store.blobs.put_file(...)
    mset.join(state)                               # atomic; refuses forged/unsigned data
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from convergent.errors import IntegrityError, MergeInputError, OutputError, RecipeError, StoreError
from convergent.sets.canonical import canonical_json, content_id
from convergent.sets.merkle import merkle_root
from convergent.sets.model import AddTag, Contribution, Genesis, Manifest, SetState
from convergent.sets.orset import new_tag
from convergent.store.store import close_opened, live_ids, open_source

if TYPE_CHECKING:
    from convergent.checkpoint.source import TensorSource
    from convergent.store.store import Store
    from convergent.strategies.api import Strategy

#: Most tensor names listed in one error message.
_SHOW = 8


@dataclass
class LiveContribution:
    """A live contribution as shown by ``status``."""

    id: str
    contribution: Contribution
    nbytes: int
    tensors: int


@dataclass
class JoinResult:
    """What a join changed: new records, add-tags and tombstones; root before and after."""

    new_contributions: int
    new_adds: int
    new_removes: int
    root_before: str
    root_after: str

    @property
    def changed(self) -> bool:
        return bool(self.new_adds or self.new_removes or self.new_contributions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "new_contributions": self.new_contributions,
            "new_adds": self.new_adds,
            "new_removes": self.new_removes,
            "root_before": self.root_before,
            "root_after": self.root_after,
        }


@dataclass
class ResolveResult:
    out_dir: Path
    set_id: str
    root: str
    #: Output file -> sha256 hex (includes convergent.json).
    files: dict[str, str]
    contributions: list[str]
    cached: bool
    seconds: float

    @property
    def digest(self) -> str:
        """One hash over the model files (sha256 of canonical {file: sha256}, without convergent.json)."""
        return content_id({k: v for k, v in self.files.items() if k != PROVENANCE})

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "set_id": self.set_id,
            "root": self.root,
            "files": self.files,
            "contributions": self.contributions,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "digest": self.digest,
        }


PROVENANCE = "convergent.json"


class MergeSet:
    """A set in a store; get one from ``Store.get_set`` / ``Store.create_set`` / ``Store.add_set``."""

    def __init__(self, store: Store, set_id: str, genesis: Genesis):
        self.store = store
        self.id = set_id
        self.genesis = genesis

    def __repr__(self) -> str:
        return f"MergeSet({self.name!r}, id={self.id[:12]}…)"

    @property
    def name(self) -> str:
        return self.genesis.name

    @property
    def strategy(self) -> Strategy:
        from convergent.strategies.run import get_strategy

        return get_strategy(self.genesis.strategy)

    # -- reads -----------------------------------------------------------
    @property
    def root(self) -> str:
        """Merkle root over the live contributions (hex)."""
        with self.store.db.lock:
            row = self.store.db.conn.execute("SELECT root FROM sets WHERE id=?", (self.id,)).fetchone()
        if row is None:
            raise StoreError(f"set {self.id[:12]}… is not in the store")
        return row[0]

    def live(self) -> list[str]:
        """Live contribution ids in canonical order."""
        with self.store.db.lock:
            return live_ids(self.store.db.conn, self.id)

    def contribution(self, contribution_id: str) -> Contribution:
        """A contribution of this set by full id or unique prefix."""
        cid = self._resolve_id(contribution_id)
        with self.store.db.lock:
            row = self.store.db.conn.execute("SELECT body FROM contributions WHERE id=?", (cid,)).fetchone()
        return Contribution.from_stored(row[0])

    def contributions(self) -> list[LiveContribution]:
        """The live contributions, in canonical order, with sizes."""
        with self.store.db.read() as c:
            ids = live_ids(c, self.id)
            out = []
            for cid in ids:
                body, nbytes, ntensors = c.execute(
                    "SELECT c.body, m.nbytes, m.tensors FROM contributions c JOIN manifests m ON m.id = c.manifest_id "
                    "WHERE c.id=?",
                    (cid,),
                ).fetchone()
                out.append(LiveContribution(cid, Contribution.from_stored(body), nbytes, ntensors))
        return out

    def base_manifest(self) -> Manifest:
        return self.store.get_manifest(self.genesis.base)

    def state(self) -> SetState:
        """Everything this replica knows about the set (genesis, contributions, tags, tombstones)."""
        with self.store.db.read() as c:
            bodies = c.execute("SELECT body FROM contributions WHERE set_id=? ORDER BY id", (self.id,)).fetchall()
            adds = c.execute("SELECT contribution_id, tag FROM tags WHERE set_id=?", (self.id,)).fetchall()
            removes = c.execute("SELECT contribution_id, tag FROM tombstones WHERE set_id=?", (self.id,)).fetchall()
        return _state(self.id, self.genesis, bodies, adds, removes)

    def state_since(self, root: str) -> SetState:
        """What this replica learnt after its root was ``root``: a delta that is safe to join anywhere."""
        seq = self._seq_of_root(root)
        with self.store.db.read() as c:
            adds = c.execute(
                "SELECT contribution_id, tag FROM tags WHERE set_id=? AND seq>?", (self.id, seq)
            ).fetchall()
            removes = c.execute(
                "SELECT contribution_id, tag FROM tombstones WHERE set_id=? AND seq>?", (self.id, seq)
            ).fetchall()
            needed = sorted({a[0] for a in adds})
            bodies = [c.execute("SELECT body FROM contributions WHERE id=?", (cid,)).fetchone() for cid in needed]
        return _state(self.id, self.genesis, bodies, adds, removes)

    def _seq_of_root(self, root: str) -> int:
        with self.store.db.lock:
            row = self.store.db.conn.execute(
                "SELECT MAX(seq) FROM log WHERE set_id=? AND root=?", (self.id, root)
            ).fetchone()
        if row is None or row[0] is None:
            raise StoreError(
                f"root {root[:16]}… is not in the history of set '{self.name}' on this replica",
                "export without --since to send the full state",
            )
        return int(row[0])

    def log(self) -> list[dict[str, Any]]:
        """History of creates, adds, removes and joins on this replica, oldest first."""
        with self.store.db.lock:
            rows = self.store.db.conn.execute(
                "SELECT seq, op, detail, root, at FROM log WHERE set_id=? ORDER BY seq", (self.id,)
            ).fetchall()
        return [{"seq": s, "op": op, "root": r, "at": at, **json.loads(d)} for s, op, d, r, at in rows]

    def missing(self, state: SetState) -> tuple[list[str], list[str]]:
        """(manifest ids, blob digests) needed before ``join(state)`` can succeed.

        Blob digests are known only for manifests present here: fetch the
        manifests first, then call again for their blobs.
        """
        with self.store.db.lock:
            known = {
                r[0]
                for r in self.store.db.conn.execute(
                    "SELECT id FROM contributions WHERE set_id=?", (self.id,)
                ).fetchall()
            }
        wanted = {state.genesis.base} | {c.manifest for c in state.contributions if c.id not in known}
        manifests: list[str] = []
        blobs: set[str] = set()
        for mid in sorted(wanted):
            if not self.store.has_manifest(mid):
                manifests.append(mid)
            else:
                blobs.update(self.store.blobs.missing(self.store.get_manifest(mid).blobs()))
        return manifests, sorted(blobs)

    # -- writes ----------------------------------------------------------
    def add(
        self,
        checkpoint: TensorSource | str | Path,
        weight: float = 1.0,
        params: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        key: Any = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> str:
        """Ingest ``checkpoint`` and add it; returns the contribution id.

        ``key`` is an Ed25519 private key (or a key file path) to sign with.
        MergeInputError if its tensor names/shapes do not match the base.
        """
        from convergent.sets import identity

        params = dict(params or {})
        if "weight" in params:
            weight = float(params.pop("weight"))
        weight = float(weight)
        self._check_model_params(weight, params)
        if key is not None and not hasattr(key, "sign"):
            key = identity.load_private_key(key)
        signer = identity.public_hex(key) if key is not None else None
        if self.genesis.require_signed and (signer is None or signer not in self.genesis.allowed_keys):
            from convergent.errors import SignatureError

            raise SignatureError(
                f"set '{self.name}' requires contributions signed by an allowed key",
                "pass --key FILE with one of: " + ", ".join(k[:16] + "…" for k in self.genesis.allowed_keys),
            )
        source, _files = open_source(checkpoint)
        try:
            base = self.base_manifest()
            label = getattr(source, "label", "checkpoint")
            check_fits(base, {n: source.info(n).shape for n in source.names()}, label)
            manifest = self.store.ingest_blobs(source, None, progress)
        finally:
            close_opened(checkpoint, source)
        try:
            contrib = Contribution(
                set=self.id,
                manifest=manifest.id,
                weight=weight,
                params=params,
                meta=dict(meta or {}),
                signer=signer,
            )
        except ValidationError as exc:
            raise RecipeError(f"invalid contribution: {exc.errors()[0]['msg']}") from None
        if key is not None:
            contrib = identity.sign(contrib, key)
        identity.check_policy(contrib, self.genesis)
        cid = contrib.id
        tag = new_tag()
        with self.store.db.write() as c:
            self.store._insert_manifest(c, manifest)
            seq = _log(c, self.id, "add", {"contribution": cid, "tag": tag, "weight": weight})
            c.execute(
                "INSERT OR IGNORE INTO contributions(id, set_id, manifest_id, body) VALUES (?, ?, ?, ?)",
                (cid, self.id, manifest.id, contrib.canonical()),
            )
            c.execute(
                "INSERT INTO tags(set_id, contribution_id, tag, seq) VALUES (?, ?, ?, ?)", (self.id, cid, tag, seq)
            )
            _update_root(c, self.id, seq)
        return cid

    def remove(self, contribution_id: str) -> int:
        """OR-Set remove: tombstone every add-tag of it seen here; returns how many tags were tombstoned."""
        cid = self._resolve_id(contribution_id)
        with self.store.db.write() as c:
            tags = [
                r[0]
                for r in c.execute(
                    "SELECT t.tag FROM tags t LEFT JOIN tombstones r ON r.set_id=t.set_id AND "
                    "r.contribution_id=t.contribution_id AND r.tag=t.tag "
                    "WHERE t.set_id=? AND t.contribution_id=? AND r.tag IS NULL ORDER BY t.tag",
                    (self.id, cid),
                ).fetchall()
            ]
            if not tags:
                raise StoreError(f"contribution {cid[:12]}… is not live in set '{self.name}' (already removed)")
            seq = _log(c, self.id, "remove", {"contribution": cid, "tags": tags})
            c.executemany(
                "INSERT OR IGNORE INTO tombstones(set_id, contribution_id, tag, seq) VALUES (?, ?, ?, ?)",
                [(self.id, cid, t, seq) for t in tags],
            )
            _update_root(c, self.id, seq)
        return len(tags)

    def join(self, state: SetState, origin: str = "") -> JoinResult:
        """Join a replica's state, atomically.

        Refuses (SignatureError/IntegrityError/StoreError) without keeping
        anything when the state is for another set, has forged ids, bad or
        missing required signatures, or references data not in the store.
        """
        if state.set_id != self.id:
            raise StoreError(f"state is for set {state.set_id[:12]}…, not '{self.name}' ({self.id[:12]}…)")
        return join_state(self.store, state, origin=origin)

    def resolve(
        self,
        out_dir: str | Path,
        threads: int = 2,
        memory_limit: int | None = None,
        overwrite: bool = False,
        use_cache: bool = True,
        progress: Callable[[int, int], None] | None = None,
        chunk_rows: int | None = None,
    ) -> ResolveResult:
        """Merge the live contributions (canonical order, seed = root) into ``out_dir``.

        Writes the model (sharded safetensors + the base's config/tokenizer
        files) and ``convergent.json`` provenance. With ``use_cache``, a
        previous resolve of the same root is reused when its files still
        verify (same directory: nothing to do; elsewhere: copied).
        """
        from convergent.sets.resolve import resolve_set

        return resolve_set(
            self,
            Path(out_dir),
            threads=threads,
            memory_limit=memory_limit,
            overwrite=overwrite,
            use_cache=use_cache,
            progress=progress,
            chunk_rows=chunk_rows,
        )

    # -- helpers ---------------------------------------------------------
    def _resolve_id(self, contribution_id: str) -> str:
        key = str(contribution_id).strip().lower()
        with self.store.db.lock:
            rows = (
                self.store.db.conn.execute(
                    "SELECT id FROM contributions WHERE set_id=? AND substr(id, 1, ?) = ?", (self.id, len(key), key)
                ).fetchall()
                if len(key) >= 4
                else []
            )
        if not rows:
            raise StoreError(
                f"no contribution '{contribution_id}' in set '{self.name}'", "'convergent status SET' lists them"
            )
        if len(rows) > 1:
            raise StoreError(f"'{contribution_id}' matches {len(rows)} contributions", "give more of the id")
        return rows[0][0]

    def _check_model_params(self, weight: float, params: Mapping[str, Any]) -> None:
        from convergent.strategies.run import validate_model_params

        strat = self.strategy
        if "weight" not in strat.model_params.model_fields and weight != 1.0:
            raise RecipeError(f"merge method '{strat.name}' takes no per-model weight", "leave --weight out")
        validate_model_params(strat, model_params_of(strat, weight, params))


def model_params_of(strat: Strategy, weight: float, params: Mapping[str, Any]) -> dict[str, Any]:
    """The per-model parameters the strategy sees: the contribution's params plus its weight."""
    out = dict(params)
    if "weight" in strat.model_params.model_fields:
        out["weight"] = weight
    return out


def check_genesis_params(strat: Strategy, params: Mapping[str, Any]) -> None:
    """Validate a set's parameters: global ones, plus per-model ones given once for every contribution."""
    from convergent.errors import suggest
    from convergent.strategies.run import validate_model_params, validate_params

    glob_fields, model_fields = set(strat.params.model_fields), set(strat.model_params.model_fields)
    for key in params:
        if key not in glob_fields and key not in model_fields:
            allowed = sorted(glob_fields | model_fields)
            hint = suggest(key, allowed)
            raise RecipeError(
                f"unknown parameter '{key}' for merge method '{strat.name}'",
                f"{hint + ' ' if hint else ''}allowed: {', '.join(allowed) or 'none'}",
            )
    validate_params(strat, {k: v for k, v in params.items() if k in glob_fields})
    validate_model_params(strat, {k: v for k, v in params.items() if k in model_fields})


def check_fits(base: Manifest, shapes: Mapping[str, Iterable[int]], label: str) -> None:
    """MergeInputError naming the tensors when names or shapes differ from the base's."""
    want = {n: tuple(e.shape) for n, e in base.tensors.items()}
    got = {n: tuple(s) for n, s in shapes.items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(n for n in set(want) & set(got) if want[n] != got[n])
    if not (missing or extra or wrong):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s) of the base: {_names(missing)}")
    if extra:
        parts.append(f"{len(extra)} tensor(s) not in the base: {_names(extra)}")
    if wrong:
        parts.append(
            f"{len(wrong)} shape mismatch(es): "
            + ", ".join(f"{n} {list(got[n])} vs base {list(want[n])}" for n in wrong[:_SHOW])
            + (" …" if len(wrong) > _SHOW else "")
        )
    raise MergeInputError(
        f"{label} does not fit the set's base: " + "; ".join(parts),
        "contributions must have the base model's tensor names and shapes",
    )


def _names(names: list[str]) -> str:
    return ", ".join(names[:_SHOW]) + (f" … (+{len(names) - _SHOW})" if len(names) > _SHOW else "")


def _state(
    set_id: str, genesis: Genesis, bodies: Iterable[Any], adds: Iterable[Any], removes: Iterable[Any]
) -> SetState:
    return SetState.model_construct(
        set_id=set_id,
        genesis=genesis,
        contributions=tuple(Contribution.from_stored(b[0]) for b in bodies),
        adds=tuple(AddTag.model_construct(contribution=c, tag=t) for c, t in sorted(adds)),
        removes=tuple(AddTag.model_construct(contribution=c, tag=t) for c, t in sorted(removes)),
    )


def _log(c: sqlite3.Connection, set_id: str, op: str, detail: Mapping[str, Any]) -> int:
    cur = c.execute(
        "INSERT INTO log(set_id, op, detail, root, at) VALUES (?, ?, ?, '', ?)",
        (set_id, op, canonical_json(dict(detail)).decode(), time.time()),
    )
    return int(cur.lastrowid)


def _update_root(c: sqlite3.Connection, set_id: str, seq: int) -> str:
    root = merkle_root(set_id, live_ids(c, set_id))
    c.execute("UPDATE sets SET root=? WHERE id=?", (root, set_id))
    c.execute("UPDATE log SET root=? WHERE seq=?", (root, seq))
    return root


def validate_state(
    store: Store,
    state: SetState,
    manifests: Mapping[str, Manifest] | None = None,
    blobs_present: Iterable[str] = (),
) -> list[Contribution]:
    """Check a received state against the store (plus ``manifests``/``blobs_present`` about to be added).

    Returns the contributions new to this store. Raises without side effects.
    """
    from convergent.sets.identity import check_policy
    from convergent.strategies.run import get_strategy, validate_model_params

    manifests = dict(manifests or {})
    extra_blobs = set(blobs_present)
    genesis = state.genesis
    if genesis.id != state.set_id:
        raise IntegrityError(f"set genesis does not hash to the set id {state.set_id[:12]}…", "nothing was kept")
    strat = get_strategy(genesis.strategy)
    try:
        check_genesis_params(strat, genesis.params)
    except RecipeError as exc:
        raise IntegrityError(f"set genesis: {exc.message}", "nothing was kept") from None
    with store.db.lock:
        known = {
            r[0]
            for r in store.db.conn.execute("SELECT id FROM contributions WHERE set_id=?", (state.set_id,)).fetchall()
        }

    def manifest(mid: str, who: str) -> Manifest:
        m = manifests.get(mid)
        if m is None:
            if not store.has_manifest(mid):
                raise StoreError(f"{who}: manifest {mid[:12]}… is not in the store", "fetch it before joining")
            m = store.get_manifest(mid)
            manifests[mid] = m
        return m

    checked: set[str] = set()

    def complete(m: Manifest, who: str) -> None:
        if m.id in checked:
            return
        lacking = [d for d in m.blobs() if d not in extra_blobs and not store.blobs.has(d)]
        if lacking:
            raise StoreError(
                f"{who}: {len(lacking)} blob(s) of its manifest are not in the store", "fetch them before joining"
            )
        checked.add(m.id)

    base = manifest(genesis.base, "base")
    complete(base, "base")
    new: list[Contribution] = []
    fits: set[str] = set()
    for c in state.contributions:
        cid = c.id
        if cid in known:
            continue
        who = f"contribution {cid[:12]}…"
        if c.set != state.set_id:
            raise IntegrityError(f"{who} belongs to set {c.set[:12]}…, not {state.set_id[:12]}…", "nothing was kept")
        check_policy(c, genesis)
        try:
            validate_model_params(strat, model_params_of(strat, c.weight, c.params))
        except RecipeError as exc:
            raise IntegrityError(f"{who}: {exc.message}", "nothing was kept") from None
        m = manifest(c.manifest, who)
        if c.manifest not in fits:
            complete(m, who)
            check_fits(base, {n: e.shape for n, e in m.tensors.items()}, who)
            fits.add(c.manifest)
        new.append(c)
    carried = {c.id for c in state.contributions} | known
    for a in state.adds:
        if a.contribution not in carried:
            raise IntegrityError(
                f"add-tag names contribution {a.contribution[:12]}…, which the state does not carry", "nothing was kept"
            )
    return new


def join_state(
    store: Store,
    state: SetState,
    manifests: Mapping[str, Manifest] | None = None,
    origin: str = "",
    learn: bool = False,
    blobs_present: Iterable[str] = (),
) -> JoinResult:
    """Validate, then in one transaction: (learn the set,) add ``manifests``, contributions, tags, tombstones."""
    sid = state.set_id
    manifests = dict(manifests or {})
    if not learn:
        with store.db.lock:
            if store.db.conn.execute("SELECT 1 FROM sets WHERE id=?", (sid,)).fetchone() is None:
                raise StoreError(f"no merge set {sid[:12]}… in {store.path}", "import a bundle of it or create it")
    new = validate_state(store, state, manifests, blobs_present)
    with store.db.write() as c:
        if learn:
            store._insert_set(c, state.genesis, "learn")
        root_before = c.execute("SELECT root FROM sets WHERE id=?", (sid,)).fetchone()[0]
        for m in manifests.values():
            store._insert_manifest(c, m)
        seq = _log(c, sid, "join", {"origin": origin})
        cur = c.executemany(
            "INSERT OR IGNORE INTO contributions(id, set_id, manifest_id, body) VALUES (?, ?, ?, ?)",
            [(x.id, sid, x.manifest, x.canonical()) for x in new],
        )
        n_contrib = max(0, cur.rowcount)
        cur = c.executemany(
            "INSERT OR IGNORE INTO tags(set_id, contribution_id, tag, seq) VALUES (?, ?, ?, ?)",
            [(sid, a.contribution, a.tag, seq) for a in state.adds],
        )
        n_adds = max(0, cur.rowcount)
        cur = c.executemany(
            "INSERT OR IGNORE INTO tombstones(set_id, contribution_id, tag, seq) VALUES (?, ?, ?, ?)",
            [(sid, r.contribution, r.tag, seq) for r in state.removes],
        )
        n_removes = max(0, cur.rowcount)
        if n_contrib or n_adds or n_removes:
            root_after = _update_root(c, sid, seq)
            c.execute(
                "UPDATE log SET detail=? WHERE seq=?",
                (
                    canonical_json(
                        {"origin": origin, "new_contributions": n_contrib, "new_adds": n_adds, "new_removes": n_removes}
                    ).decode(),
                    seq,
                ),
            )
        else:
            c.execute("DELETE FROM log WHERE seq=?", (seq,))
            root_after = root_before
    return JoinResult(n_contrib, n_adds, n_removes, root_before, root_after)


def copy_tree_atomic(src: Path, dst: Path, overwrite: bool) -> None:
    """Copy a resolved output folder to ``dst`` via a temp sibling and a rename."""
    if dst.exists() and not overwrite:
        raise OutputError(f"{dst} already exists", "pass --overwrite or choose another folder")
    tmp = dst.parent / f".{dst.name}.tmp-copy"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        old = dst.parent / f".{dst.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)
