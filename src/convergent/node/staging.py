"""Where a node keeps what peers upload until a state that needs it is accepted.

Uploaded manifests and blobs are verified against their ids on arrival, then
kept in ``<store>/tmp/node-staging/`` — never in the store itself. Only when a
pushed state passes every check (ids, signatures, shapes) are its staged blobs
moved into the store (``BlobStore.put_file`` re-verifies them) and its
manifests written in the same transaction as the join. A peer whose state is
refused leaves nothing in the store; its staged files are deleted, and staged
files nobody claimed are swept after :data:`STALE_SECONDS`.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from convergent.sets.canonical import HEX64

#: Staged files older than this are deleted when a node starts.
STALE_SECONDS = 24 * 3600


class Staging:
    def __init__(self, store: Any):
        self.store = store
        self.dir = Path(store.tmp_dir) / "node-staging"
        self.dir.mkdir(parents=True, exist_ok=True)

    # -- names -----------------------------------------------------------
    def _check(self, digest: str) -> str:
        if not isinstance(digest, str) or not HEX64.match(digest):
            raise ValueError("not a sha256 hex id")
        return digest

    def manifest_path(self, mid: str) -> Path:
        return self.dir / f"m-{self._check(mid)}.json"

    def blob_path(self, digest: str) -> Path:
        return self.dir / f"b-{self._check(digest)}.blob"

    def upload_path(self, digest: str) -> Path:
        return self.dir / f"up-{self._check(digest)}.part"

    # -- manifests -------------------------------------------------------
    def put_manifest(self, mid: str, data: bytes) -> None:
        """Stage manifest bytes already verified against ``mid``."""
        target = self.manifest_path(mid)
        tmp = self.dir / f"tmp-{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def has_manifest(self, mid: str) -> bool:
        return self.store.has_manifest(mid) or self.manifest_path(mid).is_file()

    def get_manifest(self, mid: str) -> Any:
        """A manifest from the store or the staging area (re-verified); None if neither has it."""
        from convergent.errors import IntegrityError
        from convergent.store.store import parse_manifest

        if self.store.has_manifest(mid):
            return self.store.get_manifest(mid)
        try:
            return parse_manifest(self.manifest_path(mid).read_bytes(), mid)
        except (FileNotFoundError, IntegrityError):
            return None

    # -- blobs -----------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return self.store.blobs.has(digest) or self.blob_path(digest).is_file()

    def stage_blob(self, part: Path, digest: str) -> None:
        os.replace(part, self.blob_path(digest))

    def install_blob(self, digest: str) -> bool:
        """Move a staged blob into the store (re-verified); False if it is in neither place."""
        if self.store.blobs.has(digest):
            self.blob_path(digest).unlink(missing_ok=True)
            return True
        try:
            self.store.blobs.put_file(self.blob_path(digest), digest)
        except FileNotFoundError:
            return self.store.blobs.has(digest)
        return True

    # -- housekeeping ----------------------------------------------------
    def discard(self, manifests: list[str], blobs: list[str]) -> None:
        for mid in manifests:
            self.manifest_path(mid).unlink(missing_ok=True)
        for digest in blobs:
            self.blob_path(digest).unlink(missing_ok=True)

    def sweep(self, older_than: float = STALE_SECONDS) -> int:
        """Delete staged files and abandoned partial downloads older than ``older_than`` seconds."""
        cutoff = time.time() - older_than
        removed = 0
        for f in [*self.dir.iterdir(), *Path(self.store.tmp_dir).glob("dl-*.part")]:
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
