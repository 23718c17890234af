"""The embedded default store: entries in one SQLite file on local disk, no server needed.

Writes and scans run on one dedicated thread, so the event loop never waits on the disk for them. Point reads by
key (the lookups on every request) run inline on a second, read-only connection: an indexed read of one row
takes tens of microseconds, less than handing it to a thread and back (WAL mode lets it read while the writer
writes).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cache.errors import StoreError
from cache.labels import Label, Served
from cache.sqlite_writer import SQLiteWriter
from cache.store import Entry, IndexedVector, PutResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    vid INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    namespace TEXT NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    partition TEXT NOT NULL,
    exact_key TEXT NOT NULL UNIQUE,
    response TEXT NOT NULL,
    tier TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    last_access REAL NOT NULL,
    text TEXT,
    vector BLOB,
    embedder_id TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_last_access ON entries (last_access);
CREATE INDEX IF NOT EXISTS entries_expires ON entries (expires_at);
CREATE INDEX IF NOT EXISTS entries_tenant_ns ON entries (tenant, namespace);
CREATE TABLE IF NOT EXISTS served (
    key_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    record TEXT NOT NULL,
    expires_at REAL NOT NULL,
    labelled INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, request_id)
);
CREATE INDEX IF NOT EXISTS served_expires ON served (expires_at);
CREATE TABLE IF NOT EXISTS responses (
    key_id TEXT NOT NULL,
    id TEXT NOT NULL,
    record TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key_id, id)
);
CREATE INDEX IF NOT EXISTS responses_expires ON responses (expires_at);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    scope TEXT NOT NULL,
    label TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_scope ON labels (scope, id);
CREATE TABLE IF NOT EXISTS runtime_policies (
    name TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS route_samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample TEXT NOT NULL
);
"""
_COLUMNS = (
    "vid, tenant, namespace, kind, model, partition, exact_key, response, tier, created_at, expires_at, "
    "text, vector, embedder_id, prompt_tokens, completion_tokens"
)


def _row_to_entry(row: tuple[Any, ...]) -> Entry:
    (vid, tenant, namespace, kind, model, partition, exact_key, response, tier, created, expires, text,
     vector, embedder_id, prompt_tokens, completion_tokens) = row  # fmt: skip
    return Entry(
        vid=vid, tenant=tenant, namespace=namespace, kind=kind, model=model, partition=partition,
        exact_key=exact_key, response=json.loads(response), tier=tier, created_at=created,
        expires_at=expires, text=text,
        vector=None if vector is None else np.frombuffer(vector, dtype=np.float32),
        embedder_id=embedder_id, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
    )  # fmt: skip


class SQLiteStore:
    """EntryStore on a local SQLite file (WAL mode). Open with `await SQLiteStore.open(path)`."""

    def __init__(self, writer: SQLiteWriter) -> None:
        self._writer = writer
        self._path = writer.path
        self._run = writer.run
        self._reader: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> SQLiteStore:
        """Create the directory and schema if needed and open the database."""
        # ValueError: NaN in an answer, not storable.
        writer = await SQLiteWriter.open(path, _SCHEMA, "embedded store", errors=(sqlite3.Error, OSError, ValueError))
        store = cls(writer)
        try:
            store._reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"embedded store at {path}: {exc}") from exc
        return store

    @property
    def db(self) -> sqlite3.Connection:
        return self._writer.db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction on the writer's connection, committed at the end (rolled back on an error). The
        connection is in autocommit mode, where `with db:` alone commits each statement by itself: a batch of 150
        rows cost 150 commits (about 30 us a row against 8)."""
        db = self.db
        with db:
            db.execute("BEGIN IMMEDIATE")
            yield db

    def _put(self, e: Entry, max_entries: int | None) -> PutResult:
        with self._transaction() as db:
            replaced = [r[0] for r in db.execute("SELECT vid FROM entries WHERE exact_key = ? AND vid != ?",
                                                 (e.exact_key, e.vid))]  # fmt: skip  # the same entry again: none
            db.execute("DELETE FROM entries WHERE exact_key = ?", (e.exact_key,))
            vector = None if e.vector is None else np.asarray(e.vector, dtype=np.float32).tobytes()
            db.execute(
                f"INSERT INTO entries ({_COLUMNS}, last_access) VALUES ({','.join('?' * 17)})",
                (e.vid, e.tenant, e.namespace, e.kind, e.model, e.partition, e.exact_key,
                 json.dumps(e.response, allow_nan=False), e.tier, e.created_at, e.expires_at, e.text, vector,
                 e.embedder_id, e.prompt_tokens, e.completion_tokens, e.created_at),
            )  # fmt: skip
            evicted = self._evict(max_entries, keep=e.vid) if max_entries is not None else []
        return PutResult(replaced, evicted)

    def _evict(self, max_entries: int, keep: int) -> list[int]:
        """Delete the least recently used entries past max_entries, never the one just stored."""
        (count,) = self.db.execute("SELECT COUNT(*) FROM entries").fetchone()
        if count <= max_entries:
            return []
        rows = self.db.execute(
            "SELECT vid FROM entries WHERE vid != ? ORDER BY last_access LIMIT ?", (keep, count - max_entries)
        ).fetchall()
        vids = [r[0] for r in rows]
        self._delete(vids)
        return vids

    def _delete(self, vids: list[int]) -> list[int]:
        found = []
        for vid in vids:
            if self.db.execute("DELETE FROM entries WHERE vid = ?", (vid,)).rowcount:
                found.append(vid)
        return found

    def _select(self, where: str, args: tuple[Any, ...]) -> list[Entry]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM entries WHERE {where}", args).fetchall()
        return [_row_to_entry(r) for r in rows]

    def _delete_where(self, tenant: str | None, namespace: str | None) -> list[int]:
        where, args = _filters(tenant, namespace)
        with self._transaction():
            vids = [r[0] for r in self.db.execute(f"SELECT vid FROM entries WHERE {where}", args)]
            self.db.execute(f"DELETE FROM entries WHERE {where}", args)
        return vids

    def _purge(self, now: float) -> list[int]:
        with self._transaction():
            cond = "expires_at IS NOT NULL AND expires_at <= ?"
            vids = [r[0] for r in self.db.execute(f"SELECT vid FROM entries WHERE {cond}", (now,))]
            self.db.execute(f"DELETE FROM entries WHERE {cond}", (now,))
            self.db.execute("DELETE FROM served WHERE expires_at <= ?", (now,))
            self.db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))
        return vids

    # --- stored responses (the Responses API's conversation state, proxy/responses.py) --------------------------

    async def save_responses(self, items: list[tuple[str, str, str, float]]) -> None:
        """Keep stored responses, (key_id, response_id, record, expires_at) each, in one transaction."""

        def write() -> None:
            with self._transaction():
                self.db.executemany("INSERT OR REPLACE INTO responses (key_id, id, record, expires_at) VALUES "
                                    "(?, ?, ?, ?)", items)  # fmt: skip

        await self._run(write)

    async def load_response(self, key_id: str, response_id: str, now: float) -> str | None:
        """A stored response of this API key (another key's id is not found)."""
        row = await self._run(lambda: self.db.execute(
            "SELECT record FROM responses WHERE key_id = ? AND id = ? AND expires_at > ?",
            (key_id, response_id, now)).fetchone())  # fmt: skip
        return None if row is None else str(row[0])

    async def delete_response(self, key_id: str, response_id: str) -> bool:
        def delete() -> bool:
            with self.db:
                return bool(self.db.execute("DELETE FROM responses WHERE key_id = ? AND id = ?",
                                            (key_id, response_id)).rowcount)  # fmt: skip

        return await self._run(delete)

    # --- labels (cache/labels.py) -------------------------------------------------------------------------------

    async def remember(self, served: Served, expires_at: float) -> None:
        """Keep what answered a request until `expires_at`, for feedback."""

        def write() -> None:
            with self.db:
                self.db.execute(
                    "INSERT OR REPLACE INTO served (key_id, request_id, record, expires_at) VALUES (?, ?, ?, ?)",
                    (served.key_id, served.request_id, served.dumps(), expires_at),
                )

        await self._run(write)

    async def recall(self, key_id: str, request_id: str, now: float) -> Served | None:
        """What answered this tenant's request, if it is still remembered."""
        row = await self._run(lambda: self.db.execute(
            "SELECT record FROM served WHERE key_id = ? AND request_id = ? AND expires_at > ?",
            (key_id, request_id, now)).fetchone())  # fmt: skip
        return None if row is None else Served.loads(row[0])

    async def claim_label(self, key_id: str, request_id: str) -> bool:
        """True the first time a request is labelled, False after (one label per request)."""

        def claim() -> bool:
            with self.db:
                return bool(self.db.execute("UPDATE served SET labelled = 1 WHERE key_id = ? AND request_id = ? AND "
                                            "labelled = 0", (key_id, request_id)).rowcount)  # fmt: skip

        return await self._run(claim)

    async def add_label(self, label: Label, keep: int) -> None:
        """Append a label to its scope, keeping the newest `keep`."""

        def write() -> None:
            with self._transaction():
                self.db.execute("INSERT INTO labels (scope, label) VALUES (?, ?)", (label.scope, label.dumps()))
                self.db.execute("DELETE FROM labels WHERE scope = ? AND id NOT IN (SELECT id FROM labels WHERE "
                                "scope = ? ORDER BY id DESC LIMIT ?)", (label.scope, label.scope, keep))  # fmt: skip

        await self._run(write)

    async def labels(self, scope: str, limit: int) -> list[Label]:
        """The newest `limit` labels of a scope, newest first."""
        query = "SELECT label FROM labels WHERE scope = ? ORDER BY id DESC LIMIT ?"
        rows = await self._run(lambda: self.db.execute(query, (scope, limit)).fetchall())
        return [Label.loads(r[0]) for r in rows]

    async def label_scopes(self) -> list[str]:
        rows = await self._run(lambda: self.db.execute("SELECT DISTINCT scope FROM labels ORDER BY scope").fetchall())
        return [r[0] for r in rows]

    # --- runtime policies and the audit log (proxy/services.py) ------------------------------------------------

    async def save_policy(self, name: str, record: str) -> None:
        def write() -> None:
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO runtime_policies (name, record) VALUES (?, ?)", (name, record))

        await self._run(write)

    async def load_policy(self, name: str) -> str | None:
        query = "SELECT record FROM runtime_policies WHERE name = ?"
        row = await self._run(lambda: self.db.execute(query, (name,)).fetchone())
        return None if row is None else str(row[0])

    async def append_audit(self, record: str, keep: int) -> None:
        def write() -> None:
            with self._transaction():
                last = self.db.execute("INSERT INTO audit (record) VALUES (?)", (record,)).lastrowid
                if last is not None:
                    self.db.execute("DELETE FROM audit WHERE id <= ?", (last - keep,))

        await self._run(write)

    async def audit(self, limit: int) -> list[str]:
        rows = await self._run(lambda: self.db.execute("SELECT record FROM audit ORDER BY id DESC LIMIT ?",
                                                       (limit,)).fetchall())  # fmt: skip
        return [str(r[0]) for r in rows]

    # --- the cascade router's memory (proxy/router.py) ----------------------------------------------------------

    async def add_route_samples(self, samples: list[str], keep: int) -> None:
        """Append samples to the router's log, keeping the newest `keep`."""

        def write() -> None:
            with self._transaction():
                cursor = self.db.executemany("INSERT INTO route_samples (sample) VALUES (?)", [(s,) for s in samples])
                last = self.db.execute("SELECT MAX(id) FROM route_samples").fetchone()[0]
                if cursor.rowcount and last is not None:
                    self.db.execute("DELETE FROM route_samples WHERE id <= ?", (last - keep,))

        await self._run(write)

    async def route_samples(self, after: str, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` (cursor, sample) after the cursor `after` ("" from the oldest kept), oldest first."""
        query = "SELECT id, sample FROM route_samples WHERE id > ? ORDER BY id LIMIT ?"
        rows = await self._run(lambda: self.db.execute(query, (int(after or 0), limit)).fetchall())
        return [(str(i), sample) for i, sample in rows]

    async def put(self, entry: Entry, max_entries: int | None) -> PutResult:
        return await self._run(self._put, entry, max_entries)

    def _read_one(self, where: str, args: tuple[Any, ...]) -> Entry | None:
        if self._reader is None:
            raise StoreError("the embedded store is closed")
        try:
            row = self._reader.execute(f"SELECT {_COLUMNS} FROM entries WHERE {where}", args).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"embedded store at {self._path}: {exc}") from exc
        return None if row is None else _row_to_entry(row)

    async def get(self, vid: int) -> Entry | None:
        return self._read_one("vid = ?", (vid,))

    async def get_exact(self, exact_key: str, now: float) -> Entry | None:
        return self._read_one("exact_key = ? AND (expires_at IS NULL OR expires_at > ?)", (exact_key, now))

    async def touch(self, last_used: dict[int, float]) -> None:
        def update() -> None:
            with self._transaction():
                self.db.executemany(
                    "UPDATE entries SET last_access = MAX(last_access, ?) WHERE vid = ?",
                    [(when, vid) for vid, when in last_used.items()],
                )

        await self._run(update)

    async def delete(self, vids: list[int]) -> list[int]:
        def delete() -> list[int]:
            with self._transaction():  # (_put's eviction calls _delete inside its own)
                return self._delete(vids)

        return await self._run(delete)

    async def delete_where(self, *, tenant: str | None, namespace: str | None) -> list[int]:
        return await self._run(self._delete_where, tenant, namespace)

    async def flush(self) -> int:
        return len(await self.delete_where(tenant=None, namespace=None))

    async def purge_expired(self, now: float) -> list[int]:
        return await self._run(self._purge, now)

    async def count(self) -> int:
        row = await self._run(lambda: self.db.execute("SELECT COUNT(*) FROM entries").fetchone())
        return int(row[0])

    async def list_entries(self, *, tenant: str | None, namespace: str | None, limit: int) -> list[Entry]:
        where, args = _filters(tenant, namespace)
        return await self._run(self._select, f"{where} ORDER BY created_at DESC LIMIT ?", (*args, limit))

    async def iter_vectors(self, embedder_id: str) -> AsyncIterator[IndexedVector]:
        def batch(after: int) -> list[tuple[int, str, bytes]]:
            return self.db.execute(
                "SELECT vid, partition, vector FROM entries WHERE vector IS NOT NULL AND embedder_id = ? "
                "AND vid > ? ORDER BY vid LIMIT 5000",
                (embedder_id, after),
            ).fetchall()

        after = 0
        while rows := await self._run(batch, after):
            for vid, partition, vector in rows:
                yield IndexedVector(vid, partition, np.frombuffer(vector, dtype=np.float32))
            after = rows[-1][0]

    async def ping(self) -> None:
        await self._run(lambda: self.db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        await self._writer.close()


def _filters(tenant: str | None, namespace: str | None) -> tuple[str, tuple[Any, ...]]:
    clauses, args = ["1 = 1"], []
    if tenant is not None:
        clauses.append("tenant = ?")
        args.append(tenant)
    if namespace is not None:
        clauses.append("namespace = ?")
        args.append(namespace)
    return " AND ".join(clauses), tuple(args)
