"""``Store``: blobs + SQLite metadata; the entry point of the Python API."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from convergent.errors import CheckpointError, IntegrityError, RecipeError, StoreError, suggest
from convergent.sets.canonical import HEX64, sha256_hex
from convergent.sets.merkle import merkle_root
from convergent.sets.model import Contribution, Genesis, Manifest, TensorEntry
from convergent.store.blobs import BlobStore, dtype_name, tensor_bytes, tensor_digest
from convergent.store.db import Database

if TYPE_CHECKING:
    from convergent.checkpoint.source import TensorSource
    from convergent.sets.mergeset import MergeSet

#: Tensors bigger than this are streamed into their blob in row chunks.
STREAM_BYTES = 64 << 20
#: Tensors ingested in parallel.
INGEST_THREADS = min(4, os.cpu_count() or 1)


def default_store_path() -> Path:
    """``$CONVERGENT_HOME`` if set, else ``./.convergent``."""
    env = os.environ.get("CONVERGENT_HOME")
    return Path(env) if env else Path.cwd() / ".convergent"


@dataclass
class SetInfo:
    """One row of ``Store.list_sets()``."""

    id: str
    name: str
    strategy: str
    root: str
    live: int


@dataclass
class FsckReport:
    """What ``fsck`` found. ``ok`` is False when anything referenced is missing or corrupt."""

    blobs_checked: int = 0
    manifests_checked: int = 0
    contributions_checked: int = 0
    sets_checked: int = 0
    errors: list[str] = field(default_factory=list)
    #: Blobs no manifest references (left by an interrupted write; harmless).
    unreferenced_blobs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "blobs_checked": self.blobs_checked,
            "manifests_checked": self.manifests_checked,
            "contributions_checked": self.contributions_checked,
            "sets_checked": self.sets_checked,
            "errors": self.errors,
            "unreferenced_blobs": self.unreferenced_blobs,
        }


def open_source(checkpoint: TensorSource | str | Path) -> tuple[TensorSource, dict[str, Path]]:
    """A TensorSource and its non-tensor files, from a path (via the checkpoint reader) or a source."""
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist", "give a model folder or a .safetensors file")
        from convergent.checkpoint.reader import open_checkpoint

        ckpt = open_checkpoint(path)
        files_fn = getattr(ckpt, "files", None)
        files = dict(files_fn()) if callable(files_fn) else {}
        return ckpt, files
    files_fn = getattr(checkpoint, "files", None)
    files = {}
    if callable(files_fn):
        got = files_fn()
        files = {k: v for k, v in got.items() if isinstance(v, (str, Path))} if isinstance(got, Mapping) else {}
    return checkpoint, {k: Path(v) for k, v in files.items()}


def close_opened(given: Any, source: Any) -> None:
    """Close a checkpoint that ``open_source`` opened from a path (sources passed in stay open)."""
    if isinstance(given, (str, Path)) and callable(getattr(source, "close", None)):
        source.close()


class Store:
    """A store directory. Thread-safe; several processes may open the same store."""

    DB_NAME = "store.db"

    def __init__(self, path: Path):
        self.path = path
        self.tmp_dir = path / "tmp"
        self.blobs = BlobStore(path / "blobs", self.tmp_dir)
        self.db = Database(path / self.DB_NAME)
        self.blobs.clean_temp()

    @classmethod
    def open(cls, path: str | Path | None = None, create: bool = True) -> Store:
        """Open (creating if needed) the store at ``path`` or the default location."""
        p = Path(path) if path is not None else default_store_path()
        if not (p / cls.DB_NAME).exists():
            if not create:
                raise StoreError(
                    f"no store at {p}",
                    "create a set first ('convergent create'), or pass --store DIR / $CONVERGENT_HOME",
                )
            if p.exists() and not p.is_dir():
                raise StoreError(f"store path {p} is a file, not a directory")
            p.mkdir(parents=True, exist_ok=True)
        try:
            return cls(p.resolve())
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the store database in {p}: {exc}", "run 'convergent fsck'") from None

    def close(self) -> None:
        """Close the database connection."""
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # -- manifests -------------------------------------------------------
    def ingest_blobs(
        self,
        source: TensorSource,
        files: Mapping[str, Path] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Manifest:
        """Stream every tensor (and file) of ``source`` into blobs; returns the manifest (not yet in the DB).

        Each tensor is hashed once; it is written only if its blob is new.
        Blobs are durable (fsynced, directories synced) when this returns.
        """
        names = source.names()
        infos = {n: source.info(n) for n in names}
        total = sum(i.nbytes for i in infos.values()) or 1
        done = 0
        lock = threading.Lock()

        def one(name: str) -> TensorEntry:
            nonlocal done
            info = infos[name]
            dtype = dtype_name(info.dtype)
            shape = tuple(info.shape)
            if info.nbytes <= STREAM_BYTES or len(shape) == 0:
                t = source.read(name)
                _check_read(source, name, t, info)
                digest = tensor_digest(t)
                if not self.blobs.has(digest):
                    with self.blobs.writer(dtype, shape, digest) as w:
                        w.write(tensor_bytes(t))
                        w.finish(sync=False)
                del t
            else:
                row_bytes = max(1, info.nbytes // shape[0]) if shape[0] else 1
                step = max(1, STREAM_BYTES // row_bytes)
                with self.blobs.writer(dtype, shape) as w:
                    for start in range(0, shape[0], step):
                        part = source.read(name, (start, min(shape[0], start + step)))
                        w.write(tensor_bytes(part))
                    digest = w.finish(sync=False)
            with lock:
                done += info.nbytes
                if progress:
                    progress(done, total)
            return TensorEntry(dtype=dtype, shape=shape, blob=digest)

        # Tensors are hashed and written in parallel (hashlib, reads, writes and fsync release the GIL);
        # at most INGEST_THREADS tensors (each at most STREAM_BYTES) are in memory at once.
        workers = max(1, min(INGEST_THREADS, len(names)))
        if workers == 1:
            entries = {n: one(n) for n in names}
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
                entries = dict(zip(names, pool.map(one, names)))
        file_entries: dict[str, str] = {}
        for fname, fpath in sorted((files or {}).items()):
            try:
                data = Path(fpath).read_bytes()
            except OSError as exc:
                raise CheckpointError(f"cannot read {fpath}: {exc.strerror}") from None
            file_entries[Path(fname).name] = self.blobs.put_bytes(data, sync=False)
        self.blobs.sync()
        return Manifest(tensors=entries, files=file_entries)

    def ingest(
        self,
        source: TensorSource | str | Path,
        files: Mapping[str, Path] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> str:
        """Stream a checkpoint's tensors (and ``files``) into blobs; store and return its manifest id."""
        src, found = open_source(source)
        try:
            manifest = self.ingest_blobs(src, files if files is not None else found, progress)
        finally:
            close_opened(source, src)
        with self.db.write() as c:
            self._insert_manifest(c, manifest)
        return manifest.id

    def _insert_manifest(self, c: sqlite3.Connection, manifest: Manifest) -> str:
        mid = manifest.id
        cur = c.execute(
            "INSERT OR IGNORE INTO manifests(id, body, nbytes, tensors) VALUES (?, ?, ?, ?)",
            (mid, manifest.canonical(), manifest.nbytes, len(manifest.tensors)),
        )
        if cur.rowcount:
            c.executemany(
                "INSERT OR IGNORE INTO manifest_blobs(manifest_id, digest) VALUES (?, ?)",
                [(mid, d) for d in sorted(manifest.blobs())],
            )
        return mid

    def has_manifest(self, manifest_id: str) -> bool:
        with self.db.lock:
            return self.db.conn.execute("SELECT 1 FROM manifests WHERE id=?", (manifest_id,)).fetchone() is not None

    def missing_manifests(self, manifest_ids: Iterable[str]) -> list[str]:
        """The ids among ``manifest_ids`` not stored here, sorted."""
        return sorted({m for m in manifest_ids if not self.has_manifest(m)})

    def get_manifest_bytes(self, manifest_id: str) -> bytes:
        """Canonical JSON bytes of a manifest (sha256 of them == its id); StoreError if unknown."""
        with self.db.lock:
            row = self.db.conn.execute("SELECT body FROM manifests WHERE id=?", (manifest_id,)).fetchone()
        if row is None:
            raise StoreError(f"manifest {str(manifest_id)[:12]}… is not in the store")
        return bytes(row[0])

    def get_manifest(self, manifest_id: str) -> Manifest:
        """The manifest ``manifest_id``; StoreError if unknown."""
        return Manifest.model_validate_json(self.get_manifest_bytes(manifest_id))

    def put_manifest_bytes(self, data: bytes, expected_id: str | None = None) -> str:
        """Store a manifest received from elsewhere; verifies it parses, is canonical and hashes to its id.

        Its blobs need not be present yet (``MergeSet.missing`` lists them);
        IntegrityError if the bytes do not match ``expected_id`` or are not a
        canonical manifest. Returns the id.
        """
        manifest = parse_manifest(data, expected_id)
        with self.db.write() as c:
            self._insert_manifest(c, manifest)
        return manifest.id

    def manifest_complete(self, manifest: Manifest) -> bool:
        return not self.blobs.missing(manifest.blobs())

    # -- sets ------------------------------------------------------------
    def list_sets(self) -> list[SetInfo]:
        """Every set in the store, sorted by name then id."""
        with self.db.read() as c:
            rows = c.execute("SELECT id, name, genesis, root FROM sets ORDER BY name, id").fetchall()
            out = []
            for sid, name, genesis, root in rows:
                live = c.execute(_LIVE_COUNT, (sid,)).fetchone()[0]
                strategy = json.loads(genesis)["strategy"]
                out.append(SetInfo(id=sid, name=name, strategy=strategy, root=root, live=live))
        return out

    def get_set(self, name_or_id: str) -> MergeSet:
        """A set by name, full id or unique id prefix; StoreError (with suggestions) otherwise."""
        from convergent.sets.mergeset import MergeSet

        key = str(name_or_id).strip()
        with self.db.lock:
            conn = self.db.conn
            rows = conn.execute("SELECT id, genesis FROM sets WHERE id=?", (key,)).fetchall()
            if not rows:
                rows = conn.execute("SELECT id, genesis FROM sets WHERE name=? ORDER BY id", (key,)).fetchall()
            if not rows and len(key) >= 4 and all(ch in "0123456789abcdef" for ch in key):
                rows = conn.execute(
                    "SELECT id, genesis FROM sets WHERE substr(id, 1, ?) = ? ORDER BY id", (len(key), key)
                ).fetchall()
            names = [r[0] for r in conn.execute("SELECT name FROM sets").fetchall()]
        if not rows:
            raise StoreError(
                f"no merge set '{key}' in {self.path}",
                suggest(key, names)
                or ("sets here: " + ", ".join(sorted(names)) if names else "create one with 'convergent create'"),
            )
        if len(rows) > 1:
            raise StoreError(f"'{key}' names {len(rows)} sets", "use the set id: " + ", ".join(r[0][:16] for r in rows))
        sid, genesis = rows[0]
        return MergeSet(self, sid, Genesis.model_validate_json(genesis))

    def create_set(
        self,
        name: str,
        strategy: str,
        base: TensorSource | str | Path,
        params: Mapping[str, Any] | None = None,
        dtype: str | None = None,
        require_signed: bool = False,
        allowed_keys: Iterable[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> MergeSet:
        """Create a set: validate strategy and parameters, ingest the base, store the genesis.

        Creating the same genesis again returns the existing set; a different
        set under a name already used here is refused.
        """
        from convergent.sets.mergeset import MergeSet, check_genesis_params
        from convergent.strategies.run import get_strategy

        strat = get_strategy(strategy)
        check_genesis_params(strat, dict(params or {}))
        keys = sorted({k for k in (allowed_keys or [])})
        if require_signed and not keys:
            raise RecipeError("--require-signed needs at least one --allow-key PUBKEY")
        src, files = open_source(base)
        try:
            manifest = self.ingest_blobs(src, files, progress)
        finally:
            close_opened(base, src)
        try:
            genesis = Genesis(
                name=name,
                strategy=strategy,
                params=dict(params or {}),
                base=manifest.id,
                dtype=dtype,
                require_signed=require_signed,
                allowed_keys=tuple(keys),
            )
        except ValidationError as exc:
            raise RecipeError(f"invalid set definition: {_first_error(exc)}") from None
        sid = genesis.id
        with self.db.write() as c:
            row = c.execute("SELECT id FROM sets WHERE name=? AND id<>?", (name, sid)).fetchone()
            if row:
                raise StoreError(
                    f"a different set named '{name}' already exists here ({row[0][:16]}…)", "choose another name"
                )
            self._insert_manifest(c, manifest)
            self._insert_set(c, genesis, "create")
        return MergeSet(self, sid, genesis)

    def add_set(self, genesis: Genesis | bytes | str) -> MergeSet:
        """Learn a set from its genesis (e.g. received from a peer); idempotent.

        The base manifest need not be present yet: ``mset.missing(state)``
        lists it and its blobs, and ``join`` requires them.
        """
        from convergent.sets.mergeset import MergeSet, check_genesis_params
        from convergent.strategies.run import get_strategy

        if not isinstance(genesis, Genesis):
            try:
                genesis = Genesis.model_validate_json(genesis)
            except ValidationError as exc:
                raise IntegrityError(f"invalid set genesis: {_first_error(exc)}") from None
        check_genesis_params(get_strategy(genesis.strategy), genesis.params)
        with self.db.write() as c:
            self._insert_set(c, genesis, "learn")
        return MergeSet(self, genesis.id, genesis)

    def _insert_set(self, c: sqlite3.Connection, genesis: Genesis, op: str) -> bool:
        sid = genesis.id
        root = merkle_root(sid, [])
        cur = c.execute(
            "INSERT OR IGNORE INTO sets(id, name, genesis, root) VALUES (?, ?, ?, ?)",
            (sid, genesis.name, genesis.canonical(), root),
        )
        if cur.rowcount:
            c.execute(
                "INSERT INTO log(set_id, op, detail, root, at) VALUES (?, ?, ?, ?, ?)",
                (sid, op, json.dumps({"name": genesis.name, "strategy": genesis.strategy}), root, time.time()),
            )
        return bool(cur.rowcount)

    # -- maintenance -----------------------------------------------------
    def fsck(self, progress: Callable[[int, int], None] | None = None) -> FsckReport:
        """Re-hash every blob and check every reference (manifests, contributions, tags, roots)."""
        from convergent.sets.identity import verify
        from convergent.sets.orset import live

        rep = FsckReport()
        with self.db.read() as c:
            manifests = c.execute("SELECT id, body FROM manifests").fetchall()
            mblobs = c.execute("SELECT manifest_id, digest FROM manifest_blobs").fetchall()
            sets = c.execute("SELECT id, genesis, root FROM sets").fetchall()
            contribs = c.execute("SELECT id, set_id, manifest_id, body FROM contributions").fetchall()
            tags = c.execute("SELECT set_id, contribution_id, tag FROM tags").fetchall()
            tombs = c.execute("SELECT set_id, contribution_id, tag FROM tombstones").fetchall()
            integrity = c.execute("PRAGMA quick_check").fetchone()[0]
        if integrity != "ok":
            rep.errors.append(f"database: {integrity}")
        on_disk = list(self.blobs)
        bad_blobs: dict[str, str] = {}
        for i, d in enumerate(on_disk):
            problem = self.blobs.verify(d)
            if problem:
                bad_blobs[d] = problem
                rep.errors.append(f"blob {d}: {problem}")
            if progress:
                progress(i + 1, len(on_disk))
        rep.blobs_checked = len(on_disk)
        present = set(on_disk) - set(bad_blobs)
        parsed: dict[str, Manifest] = {}
        for mid, body in manifests:
            rep.manifests_checked += 1
            if sha256_hex(bytes(body)) != mid:
                rep.errors.append(f"manifest {mid}: body does not hash to its id")
                continue
            try:
                parsed[mid] = Manifest.model_validate_json(body)
            except ValidationError as exc:
                rep.errors.append(f"manifest {mid}: {_first_error(exc)}")
        index: dict[str, set[str]] = {}
        for mid, d in mblobs:
            index.setdefault(mid, set()).add(d)
        for mid, m in parsed.items():
            if index.get(mid, set()) != m.blobs():
                rep.errors.append(f"manifest {mid}: blob index does not match the manifest")
        # Manifests that must be complete: set bases and contributions.
        required: dict[str, str] = {}
        genesis_by_set: dict[str, Genesis] = {}
        for sid, gbody, _root in sets:
            rep.sets_checked += 1
            try:
                g = Genesis.model_validate_json(gbody)
            except ValidationError as exc:
                rep.errors.append(f"set {sid}: bad genesis: {_first_error(exc)}")
                continue
            if g.id != sid:
                rep.errors.append(f"set {sid}: genesis does not hash to the set id")
            genesis_by_set[sid] = g
        contrib_ids: dict[str, str] = {}
        for cid, sid, mid, body in contribs:
            rep.contributions_checked += 1
            try:
                contrib = Contribution.model_validate_json(body)
            except ValidationError as exc:
                rep.errors.append(f"contribution {cid}: {_first_error(exc)}")
                continue
            if contrib.id != cid or contrib.set != sid or contrib.manifest != mid:
                rep.errors.append(f"contribution {cid}: record does not match its id/set/manifest")
            try:
                verify(contrib)
            except Exception as exc:
                rep.errors.append(f"contribution {cid}: {exc}")
            if sid not in genesis_by_set:
                rep.errors.append(f"contribution {cid}: unknown set {sid}")
            required[mid] = f"contribution {cid[:12]}"
            contrib_ids[cid] = sid
        for mid, who in sorted(required.items()):
            m = parsed.get(mid)
            if m is None:
                rep.errors.append(f"{who}: manifest {mid} is missing")
                continue
            for d in sorted(m.blobs() - present):
                rep.errors.append(f"{who}: blob {d} of manifest {mid[:12]} is {bad_blobs.get(d, 'missing')}")
        live_tags: dict[str, list[tuple[str, str]]] = {}
        for sid, cid, tag in tags:
            if contrib_ids.get(cid) != sid:
                rep.errors.append(f"set {sid[:12]}: add-tag {tag} names unknown contribution {cid}")
            live_tags.setdefault(sid, []).append((cid, tag))
        dead: dict[str, list[tuple[str, str]]] = {}
        for sid, cid, tag in tombs:
            dead.setdefault(sid, []).append((cid, tag))
        for sid, _g, root in sets:
            if root != merkle_root(sid, live(live_tags.get(sid, []), dead.get(sid, []))):
                rep.errors.append(f"set {sid}: stored root does not match its live contributions")
        referenced = {d for _mid, d in mblobs}
        rep.unreferenced_blobs = sorted(present - referenced)
        return rep


_LIVE = """
SELECT DISTINCT t.contribution_id FROM tags t
LEFT JOIN tombstones r ON r.set_id = t.set_id AND r.contribution_id = t.contribution_id AND r.tag = t.tag
WHERE t.set_id = ? AND r.tag IS NULL ORDER BY t.contribution_id
"""
_LIVE_COUNT = f"SELECT COUNT(*) FROM ({_LIVE})"


def live_ids(c: sqlite3.Connection, set_id: str) -> list[str]:
    return [r[0] for r in c.execute(_LIVE, (set_id,)).fetchall()]


def parse_manifest(data: bytes, expected_id: str | None = None) -> Manifest:
    """A manifest from canonical bytes; IntegrityError if malformed, non-canonical or not ``expected_id``."""
    actual = sha256_hex(bytes(data))
    if expected_id is not None and actual != expected_id:
        raise IntegrityError(
            f"manifest {str(expected_id)[:12]}… does not match its hash (got {actual[:12]}…)", "nothing was kept"
        )
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise IntegrityError(f"not a valid manifest: {_first_error(exc)}") from None
    if manifest.canonical() != bytes(data):
        raise IntegrityError("manifest bytes are not canonical JSON", "send the bytes exactly as the store holds them")
    return manifest


def _check_read(source: Any, name: str, t: Any, info: Any) -> None:
    if tuple(t.shape) != tuple(info.shape) or t.dtype != info.dtype:
        raise CheckpointError(f"{getattr(source, 'label', 'checkpoint')}: tensor {name} does not match its header")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))


__all__ = ["HEX64", "FsckReport", "SetInfo", "Store", "default_store_path", "open_source", "parse_manifest"]
