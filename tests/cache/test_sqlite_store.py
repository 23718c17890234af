"""What is SQLite's own, on a real file in a temporary directory: it persists across a reopen, fails once closed,
purges by the time it is given and pages vectors in vid order. The EntryStore contract it shares with Redis is in
tests/cache/test_stores.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cache.errors import StoreError
from cache.sqlite_store import SQLiteStore
from tests.cache.test_stores import RESPONSE, T0, entry


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = await SQLiteStore.open(tmp_path / "x.sqlite3")
    yield s
    await s.close()


async def test_purge_goes_by_the_time_given(store: SQLiteStore) -> None:
    """SQLite compares expires_at with `now`; Redis purges what Redis itself expired (test_redis_store.py)."""
    await store.put(entry(1, expires_at=T0 + 10), None)
    await store.put(entry(2, expires_at=T0 + 20), None)
    await store.put(entry(3), None)
    assert await store.get_exact("k1", now=T0 + 9.99) is not None
    assert await store.purge_expired(now=T0 + 15) == [1]
    assert await store.count() == 2
    assert sorted(await store.purge_expired(now=1e12)) == [2]
    assert await store.count() == 1


async def test_iter_vectors_in_vid_order(store: SQLiteStore) -> None:
    """It pages by `vid > last`, so the order is what makes the pages complete."""
    await store.put(entry(3, partition="p1"), None)
    await store.put(entry(1, partition="p2"), None)
    assert [(v.vid, v.partition) async for v in store.iter_vectors("emb")] == [(1, "p2"), (3, "p1")]


async def test_persists_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.sqlite3"
    first = await SQLiteStore.open(path)
    await first.put(entry(1), None)
    await first.put(entry(2, expires_at=T0 + 50), None)
    await first.close()
    with pytest.raises(StoreError):
        _ = first.db
    second = await SQLiteStore.open(path)
    try:
        await second.ping()
        assert await second.count() == 2
        got = await second.get_exact("k2", now=T0 + 1)
        assert got is not None and got.response == RESPONSE and got.expires_at == T0 + 50
        assert [v.vid async for v in second.iter_vectors("emb")] == [1, 2]
    finally:
        await second.close()


async def test_a_batch_is_one_transaction(store: SQLiteStore) -> None:
    """The writer's connection autocommits each statement unless told otherwise: a batch of stored responses (or
    route samples, or touches) is one transaction, so that it costs one commit, and a batch that fails leaves
    nothing half written."""
    import time

    later = time.time() + 3600
    with pytest.raises(StoreError):  # the second row breaks NOT NULL: the first must not stay
        await store.save_responses([("k-a", "resp_1", "{}", later), ("k-a", "resp_2", None, later)])  # type: ignore[list-item]
    assert await store.load_response("k-a", "resp_1", time.time()) is None
    await store.save_responses([("k-a", f"resp_{i}", "{}", later) for i in range(50)])
    assert await store.load_response("k-a", "resp_49", time.time()) == "{}"
