"""One SQLite connection used from one dedicated thread: the write path of the embedded stores (entries, budget
counters). The event loop never waits on the disk, and writes are serialised without locks of our own."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from cache.errors import StoreError

T = TypeVar("T")


class SQLiteWriter:
    """Opens `path` in WAL mode with `schema`, runs functions on its thread, and turns database errors into
    StoreError named by `label`. Open with `await SQLiteWriter.open(...)`."""

    def __init__(self, path: Path, label: str, errors: tuple[type[Exception], ...] = (sqlite3.Error, OSError)) -> None:
        self.path = path
        self.label = label
        self._errors = errors
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{label.split()[0]}")
        self._db: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: Path, schema: str, label: str, **options: Any) -> SQLiteWriter:
        writer = cls(path, label, **options)
        await writer.run(writer._connect, schema)
        return writer

    def _connect(self, schema: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(schema)
        self._db = db

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the writer thread."""
        if self._closed:  # the executor is shut down: it would raise a bare RuntimeError
            raise StoreError(f"the {self.label} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except self._errors as exc:
            raise StoreError(f"{self.label} at {self.path}: {exc}") from exc

    @property
    def db(self) -> sqlite3.Connection:
        """The connection (use it on the writer thread only)."""
        if self._db is None:
            raise StoreError(f"the {self.label} is closed")
        return self._db

    async def close(self) -> None:
        if self._db is not None:
            await self.run(self._db.close)
            self._db = None
        self._closed = True
        self._executor.shutdown(wait=True)
