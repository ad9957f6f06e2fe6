"""The store's SQLite database: schema, connection, one transaction per operation.

WAL journal, ``synchronous=FULL``: a committed operation survives a process
kill (and a power cut). Writers take the write lock up front
(``BEGIN IMMEDIATE``) and wait up to ``busy_timeout`` for other processes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Canonical JSON of manifests, manifest_blobs indexes the blobs they reference.
CREATE TABLE IF NOT EXISTS manifests (
    id TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    nbytes INTEGER NOT NULL,
    tensors INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS manifest_blobs (
    manifest_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (manifest_id, digest)
);
CREATE INDEX IF NOT EXISTS manifest_blobs_digest ON manifest_blobs(digest);
CREATE TABLE IF NOT EXISTS sets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    genesis BLOB NOT NULL,
    root TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sets_name ON sets(name);
-- Contribution records (canonical JSON incl. signature), every one has its manifest and blobs.
CREATE TABLE IF NOT EXISTS contributions (
    id TEXT PRIMARY KEY,
    set_id TEXT NOT NULL,
    manifest_id TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS contributions_set ON contributions(set_id);
-- OR-Set add-tags and tombstones, seq = the log entry that brought them here.
CREATE TABLE IF NOT EXISTS tags (
    set_id TEXT NOT NULL,
    contribution_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (set_id, contribution_id, tag)
);
CREATE TABLE IF NOT EXISTS tombstones (
    set_id TEXT NOT NULL,
    contribution_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (set_id, contribution_id, tag)
);
-- Local history (not replicated): op = create|add|remove|join, root after the op.
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    set_id TEXT NOT NULL,
    op TEXT NOT NULL,
    detail TEXT NOT NULL,
    root TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS log_set ON log(set_id, seq);
-- Resolve cache: output files and hashes of a resolve of (set, root)
CREATE TABLE IF NOT EXISTS resolves (
    set_id TEXT NOT NULL,
    root TEXT NOT NULL,
    out_dir TEXT NOT NULL,
    files TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (set_id, root, out_dir)
);
"""


class Database:
    """One connection shared by the threads of a process, guarded by a lock."""

    def __init__(self, path: Path, timeout: float = 60.0):
        self.path = path
        self.lock = threading.RLock()
        self.conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self.conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        self.conn.execute("PRAGMA journal_mode=WAL")
        from convergent.durable import DURABLE

        self.conn.execute(f"PRAGMA synchronous={'FULL' if DURABLE else 'NORMAL'}")
        with self.write() as c:
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            row = c.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                from convergent.errors import StoreError

                raise StoreError(f"store schema {row[0]} is not supported by this version ({SCHEMA_VERSION})")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any exception."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: a consistent snapshot across several queries."""
        with self.lock:
            self.conn.execute("BEGIN")
            try:
                yield self.conn
            finally:
                self.conn.execute("COMMIT")

    def close(self) -> None:
        with self.lock:
            self.conn.close()
