"""Durable files: fsync helpers and streaming file hashes shared by the writer and the store."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: fsync files and directories (always, unless CONVERGENT_UNSAFE_NO_FSYNC=1, which only
#: benchmarks of CPU cost use: a process kill is still safe without it, a power cut is not).
DURABLE = os.environ.get("CONVERGENT_UNSAFE_NO_FSYNC") != "1"
#: Bytes read per step when hashing.
HASH_CHUNK = 8 << 20


def fsync_dir(path: Path) -> None:
    """Make renames and creations in ``path`` durable (best effort where directories cannot be opened)."""
    if not DURABLE:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk before it is renamed into a visible place."""
    if not DURABLE:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = HASH_CHUNK) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
