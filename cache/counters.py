"""Counters for token budgets and rate limits, kept beside the cache's entries: a local SQLite file by default
(Redis, atomic through a Lua script, in `cache.redis_counters`).

A counter is one integer under a key that names its window (e.g. `budget:<key id>:tokens:day:20261124`), so a
window resets by moving to a new key; old keys expire. `add` is the one atomic operation everything is built
on: check every limit and add every amount, or change nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cache.sqlite_writer import SQLiteWriter

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS counters_expires ON counters (expires_at);
"""


@dataclass(frozen=True)
class Count:
    """An amount to add to one counter; with a limit, the add happens only if the result stays within it."""

    key: str
    amount: int
    limit: int | None
    expires_at: float  # the end of the counter's window: after it the key may be dropped


class CounterStore(Protocol):
    """Where counters live. Implementations make `add` atomic across every process that shares them."""

    async def add(self, counts: Sequence[Count], *, check: bool) -> tuple[bool, list[int]]:
        """Atomically: when `check` and some count would pass its limit (value + amount > limit), change nothing
        and return (False, current values); otherwise add every amount (never below 0) and return (True, new
        values). Values are in the order of `counts`; keys must be distinct within one call."""
        ...

    async def get(self, keys: Sequence[str]) -> list[int]:
        """Current values (0 for a key never written or expired)."""
        ...

    async def purge(self, now: float) -> int:
        """Drop counters whose window has ended; returns how many."""
        ...

    async def close(self) -> None: ...


class SQLiteCounters:
    """CounterStore in a local SQLite file. Every write runs on one thread inside BEGIN IMMEDIATE, so adds are
    atomic between tasks of this process and between processes sharing the file."""

    def __init__(self, writer: SQLiteWriter, clock: Callable[[], float]) -> None:
        self._writer = writer
        self._run = writer.run
        self._clock = clock

    @classmethod
    async def open(cls, path: Path, clock: Callable[[], float]) -> SQLiteCounters:
        """Create the file and schema if needed."""
        return cls(await SQLiteWriter.open(path, _SCHEMA, "budget counters"), clock)

    @property
    def db(self) -> sqlite3.Connection:
        return self._writer.db

    def _values(self, keys: Sequence[str]) -> list[int]:
        now = self._clock()
        values = []
        for key in keys:
            row = self.db.execute("SELECT value, expires_at FROM counters WHERE key = ?", (key,)).fetchone()
            values.append(int(row[0]) if row is not None and row[1] > now else 0)
        return values

    def _add(self, counts: Sequence[Count], check: bool) -> tuple[bool, list[int]]:
        db = self.db
        with db:
            db.execute("BEGIN IMMEDIATE")
            current = self._values([c.key for c in counts])
            pairs = list(zip(counts, current, strict=True))
            if check and any(c.limit is not None and v + c.amount > c.limit for c, v in pairs):
                return False, current
            new = [max(0, v + c.amount) for c, v in pairs]
            db.executemany(
                "INSERT INTO counters (key, value, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                [(c.key, value, c.expires_at) for c, value in zip(counts, new, strict=True)],
            )
        return True, new

    async def add(self, counts: Sequence[Count], *, check: bool) -> tuple[bool, list[int]]:
        return await self._run(self._add, counts, check)

    async def get(self, keys: Sequence[str]) -> list[int]:
        return await self._run(self._values, keys)

    async def purge(self, now: float) -> int:
        def purge() -> int:
            with self.db:
                return self.db.execute("DELETE FROM counters WHERE expires_at <= ?", (now,)).rowcount

        return await self._run(purge)

    async def close(self) -> None:
        await self._writer.close()
