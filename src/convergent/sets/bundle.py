"""Self-contained bundles: a set's state plus the manifests and blobs it needs, in one tar file.

Replicas exchange bundles without a network (``convergent export`` /
``convergent import``). Layout (an uncompressed tar, members in this order,
all timestamps zero so equal content gives equal bytes)::

    bundle.json            {"format", "set_id", "since", "state", "manifests": [...], "blobs": [...]}
    manifests/<id>.json    canonical manifest bytes (sha256 == id)
    blobs/<digest>         blob files (sha256 == digest)

Import reads the tar as a stream, checks every manifest and blob against its
hash while staging it in the store's temp dir, validates the state (ids,
signatures, signature policy, shapes, completeness), and only then moves the
blobs into place and joins the state in one transaction. A corrupt or forged
bundle is refused and the store is left as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from convergent.durable import DURABLE, fsync_dir
from convergent.errors import IntegrityError, StoreError
from convergent.sets.canonical import HEX64, canonical_json
from convergent.sets.model import Manifest, SetState
from convergent.store.blobs import IO_CHUNK, parse_header
from convergent.store.store import parse_manifest

if TYPE_CHECKING:
    from convergent.sets.mergeset import JoinResult, MergeSet
    from convergent.store.store import Store

FORMAT = "convergent-bundle/1"
_MAX_JSON = 1 << 30


@dataclass
class ExportResult:
    path: Path
    set_id: str
    root: str
    since: str | None
    manifests: int
    blobs: int
    bytes: int
    contributions: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "set_id": self.set_id,
            "root": self.root,
            "since": self.since,
            "manifests": self.manifests,
            "blobs": self.blobs,
            "bytes": self.bytes,
            "contributions": self.contributions,
        }


@dataclass
class ImportResult:
    set_id: str
    name: str
    join: JoinResult
    manifests: int
    blobs_new: int
    blobs_present: int
    learnt_set: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "set_id": self.set_id,
            "name": self.name,
            **self.join.to_dict(),
            "manifests": self.manifests,
            "blobs_new": self.blobs_new,
            "blobs_present": self.blobs_present,
            "learnt_set": self.learnt_set,
        }


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def export_bundle(mset: MergeSet, path: str | Path, since: str | None = None) -> ExportResult:
    """Write ``mset``'s state (or what it learnt after root ``since``) with the data it needs to ``path``.

    A full bundle carries the base too, so a replica that never saw the set
    can import it. The file is written to a temp name and renamed.
    """
    store = mset.store
    path = Path(path)
    root = mset.root
    if since is not None:
        state = mset.state_since(since)
        wanted = {c.manifest for c in state.contributions}
    else:
        state = mset.state()
        wanted = {state.genesis.base} | {c.manifest for c in state.contributions}
    manifests = {mid: store.get_manifest_bytes(mid) for mid in sorted(wanted)}
    blobs: set[str] = set()
    for data in manifests.values():
        blobs |= Manifest.model_validate_json(data).blobs()
    lacking = store.blobs.missing(blobs)
    if lacking:
        raise StoreError(f"{len(lacking)} blob(s) of set '{mset.name}' are missing here", "run 'convergent fsck'")
    header = canonical_json(
        {
            "format": FORMAT,
            "set_id": mset.id,
            "since": since,
            "root": root,
            "state": json.loads(state.to_json()),
            "manifests": sorted(manifests),
            "blobs": sorted(blobs),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_info("bundle.json", len(header)), io.BytesIO(header))
                for mid, data in manifests.items():
                    tar.addfile(_info(f"manifests/{mid}.json", len(data)), io.BytesIO(data))
                for d in sorted(blobs):
                    bp = store.blobs.path(d)
                    with open(bp, "rb") as f:
                        tar.addfile(_info(f"blobs/{d}", os.fstat(f.fileno()).st_size), f)
            raw.flush()
            if DURABLE:
                os.fsync(raw.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    contributions = len(state.contributions)
    return ExportResult(path, mset.id, root, since, len(manifests), len(blobs), path.stat().st_size, contributions)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise IntegrityError(f"bundle member {member.name} is too large")
    f = tar.extractfile(member)
    if f is None:
        raise IntegrityError(f"bundle member {member.name} is not a file")
    try:
        data = f.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise IntegrityError(f"bundle member {member.name} is damaged ({exc})") from None
    if len(data) != member.size:
        raise IntegrityError(f"bundle member {member.name} is truncated")
    return data


def import_bundle(store: Store, path: str | Path) -> ImportResult:
    """Verify a bundle and join it into ``store`` (learning the set if new); all or nothing."""
    from convergent.sets.mergeset import join_state

    path = Path(path)
    if not path.is_file():
        raise StoreError(f"bundle {path} does not exist")
    staged: dict[str, Path] = {}
    present: set[str] = set()
    manifests: dict[str, Manifest] = {}
    try:
        try:
            tar = tarfile.open(path, mode="r|")  # noqa: SIM115  (closed by the with below)
        except tarfile.TarError as exc:
            raise IntegrityError(f"{path} is not a convergent bundle ({exc})", "nothing was imported") from None
        with tar:
            header: dict[str, Any] | None = None
            for member in _members(tar, path):
                name = member.name
                if not member.isfile():
                    raise IntegrityError(f"bundle member {name} is not a regular file", "nothing was imported")
                if header is None:
                    if name != "bundle.json":
                        raise IntegrityError(f"{path} is not a convergent bundle (no bundle.json first)")
                    try:
                        header = json.loads(_read_member(tar, member, _MAX_JSON))
                        if header.get("format") != FORMAT:
                            raise IntegrityError(f"unsupported bundle format {header.get('format')!r}")
                        state = SetState.model_validate(header["state"])
                        want_manifests = set(header["manifests"])
                        want_blobs = set(header["blobs"])
                    except (ValueError, KeyError, TypeError, ValidationError) as exc:
                        raise IntegrityError(f"bundle.json is invalid: {str(exc).splitlines()[0]}") from None
                    if state.set_id != header.get("set_id"):
                        raise IntegrityError("bundle.json names two different sets")
                    continue
                kind, _, ident = name.partition("/")
                if kind == "manifests" and ident.endswith(".json") and ident[:-5] in want_manifests:
                    mid = ident[:-5]
                    manifests[mid] = parse_manifest(_read_member(tar, member, _MAX_JSON), expected_id=mid)
                elif kind == "blobs" and HEX64.match(ident) and ident in want_blobs:
                    if ident in staged or ident in present:
                        raise IntegrityError(f"bundle holds blob {ident[:12]}… twice")
                    tmp = _stage_blob(store, tar, member, ident)
                    if tmp is None:
                        present.add(ident)
                    else:
                        staged[ident] = tmp
                else:
                    raise IntegrityError(f"unexpected bundle member {name!r}", "nothing was imported")
            if header is None:
                raise IntegrityError(f"{path} is an empty bundle")
        lost = (want_manifests - set(manifests)) | (want_blobs - set(staged) - present)
        if lost:
            raise IntegrityError(f"bundle lists {len(lost)} item(s) it does not contain", "nothing was imported")
        learnt = not _has_set(store, state.set_id)
        from convergent.sets.mergeset import validate_state

        validate_state(store, state, manifests, blobs_present=set(staged))
        # Everything checks out: make blobs durable and visible, then one transaction.
        for digest, tmp in sorted(staged.items()):
            store.blobs._install(tmp, digest, sync=False)
        store.blobs.sync()
        staged.clear()
        result = join_state(store, state, manifests, origin=f"bundle {path.name}", learn=learnt)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return ImportResult(
        state.set_id, state.genesis.name, result, len(manifests), len(want_blobs) - len(present), len(present), learnt
    )


def _members(tar: tarfile.TarFile, path: Path):
    """Iterate a streamed tar, turning tar-level damage (truncation, bad headers) into IntegrityError."""
    it = iter(tar)
    while True:
        try:
            member = next(it)
        except StopIteration:
            return
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise IntegrityError(f"bundle {path.name} is damaged ({exc})", "nothing was imported") from None
        yield member


def _has_set(store: Store, set_id: str) -> bool:
    with store.db.lock:
        return store.db.conn.execute("SELECT 1 FROM sets WHERE id=?", (set_id,)).fetchone() is not None


def _stage_blob(store: Store, tar: tarfile.TarFile, member: tarfile.TarInfo, digest: str) -> Path | None:
    """Copy one blob member to a temp file while hashing; None if the store already has it (verified anyway)."""
    f = tar.extractfile(member)
    if f is None:
        raise IntegrityError(f"bundle member {member.name} is not a file")
    exists = store.blobs.has(digest)
    h = hashlib.sha256()
    tmp = None if exists else store.blobs.new_temp_path("w")
    out = open(tmp, "wb") if tmp is not None else None  # noqa: SIM115
    try:
        try:
            head = f.read(min(member.size, 1 << 16))
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise IntegrityError(f"bundle member {member.name} is damaged ({exc})") from None
        h.update(head)
        if out is not None:
            out.write(head)
        got = len(head)
        while True:
            try:
                chunk = f.read(IO_CHUNK)
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise IntegrityError(f"bundle member {member.name} is damaged ({exc})") from None
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
            if out is not None:
                out.write(chunk)
        if got != member.size or h.hexdigest() != digest:
            raise IntegrityError(
                f"blob {digest[:12]}… in the bundle does not match its hash",
                "the bundle is corrupt; nothing was imported",
            )
        try:
            dtype_shape = parse_header(io.BytesIO(head))
        except IntegrityError as exc:
            raise IntegrityError(f"blob {digest[:12]}… in the bundle: {exc.message}") from None
        del dtype_shape
        if out is not None:
            out.flush()
            if DURABLE:
                os.fsync(out.fileno())
    except BaseException:
        if out is not None:
            out.close()
            tmp.unlink(missing_ok=True)  # type: ignore[union-attr]
        raise
    if out is not None:
        out.close()
    return tmp
